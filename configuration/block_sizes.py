"""Block-size presets with the training noise interval U[β, ω] the paper found for each L'.

Smaller blocks prefer heavier masking (Table 8 of Arriola et al., 2025). No verified interval exists for L'=8; it
keeps the unbiased interval and relies on the data-driven search during training.
"""

BLOCK_PRESETS = {
    # L'=1 with the "tuned schedule" t ≡ 1: the NELBO is exactly the autoregressive NLL (Table 1).
    "bs1": dict(block_size=1, always_mask=True),
    # Table 8: clipped U[0.45, 0.95] is best for L'=4 (PPL 29.21, Var. NELBO 6.24 on LM1B).
    "bs4": dict(block_size=4, sampling_eps_min=0.45, sampling_eps_max=0.95, resample=True),
    # No published interval: start unbiased and let the schedule search pick one.
    "bs8": dict(block_size=8, sampling_eps_min=1e-3, sampling_eps_max=1.0, resample=True),
    # Table 8: clipped U[0.3, 0.8] is best for L'=16 (PPL 31.12 vs 31.42 for U[0.45, 0.95]).
    "bs16": dict(block_size=16, sampling_eps_min=0.3, sampling_eps_max=0.8, resample=True),
    # MDLM: one block spanning the context (block_size is set to model_length when the preset is applied).
    "mdlm": dict(block_size=None, sampling_eps_min=1e-3, sampling_eps_max=1.0),
}
