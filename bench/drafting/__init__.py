"""The drafting study: the per-call cost curve and a drafter's acceptance behind lossless block drafting (README.md)."""
