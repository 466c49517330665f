"""tiny: a baby BD3-LM for the CPU demo and the tests (about 2.8M parameters with the shipped 8192-token tokenizer).

Trains to readable word-level output on the embedded corpus in minutes on 2 CPU cores.
"""

CONFIG = dict(
    vocab_size=8192,  # the shipped byte-level BPE; its last id is the mask token
    hidden_dim=128,
    cond_dim=64,
    n_blocks=4,
    n_heads=4,
    model_length=128,  # short context: 2L = 256 tokens per vectorised pass keeps a CPU step fast
    block_size=4,
    dropout=0.0,  # too small to overfit in a demo-length run
)
