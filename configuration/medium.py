"""medium: upstream `configs/model/medium.yaml` (hidden 1024, 24 layers, 16 heads)."""

CONFIG = dict(
    vocab_size=50258,
    hidden_dim=1024,
    cond_dim=128,
    n_blocks=24,
    n_heads=16,
    model_length=1024,
    block_size=4,
    dropout=0.1,
)
