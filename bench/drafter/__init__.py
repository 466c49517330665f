"""The SmolLM2-135M drafter study (issue 27): gated-adapter drafters for lossless block drafting (README.md here)."""
