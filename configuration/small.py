"""small: the paper's "110M" model (169.6M parameters counting the untied 50258-entry embedding and head).

Matches `configs/model/small.yaml` upstream and the released `kuleshov-group/bd3lm-owt-block_size*` checkpoints.
"""

CONFIG = dict(
    vocab_size=50258,  # GPT-2 + one mask token (id 50257)
    hidden_dim=768,
    cond_dim=128,
    n_blocks=12,
    n_heads=12,
    model_length=1024,
    block_size=4,
    dropout=0.1,
)
