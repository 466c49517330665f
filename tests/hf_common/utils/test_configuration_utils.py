# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Stand-in for transformers' `tests/utils/test_configuration_utils.py`, which `test_configuration_common.py` imports
but the PyPI sdist does not ship. Only `config_common_kwargs` is used: one non-default value for every argument that
`PreTrainedConfig` of the installed transformers (5.24) accepts for any model, so that
`ConfigTester.check_config_arguments_init` can check that a model config passes each of them through."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "is_encoder_decoder": True,
    "tie_word_embeddings": False,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 3,
}
