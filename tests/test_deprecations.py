"""transformers' deprecation messages are work, not noise: the main paths log none on the installed transformers.

transformers 5.25 renamed the cache argument and output field `past_key_values` to `cache` and says so through its
logger (`warning_once`, so a message logged by an earlier test would hide a later one: the memo is cleared first) and
through `FutureWarning`s. Each path below is run with both captured; any "deprecated" message fails the test with the
message, so that the next rename is seen the day the pinned transformers moves.
"""

from __future__ import annotations

import contextlib
import io
import logging as std_logging
import warnings
from collections.abc import Iterator

import pytest
import torch
from transformers import DynamicCache
from transformers.utils import logging

from bd3lm_trainer import BD3LMTrainer
from tests.conftest import random_model, random_token_dataset, tiny_train_model, tiny_training_args
from tests.test_causal_backbone import _convert, _tokens


@contextlib.contextmanager
def no_deprecation_messages() -> Iterator[None]:
    std_logging.Logger.warning_once.cache_clear()  # warning_once is an lru_cache on the Logger class
    stream = io.StringIO()
    handler = std_logging.StreamHandler(stream)
    root = logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        root.removeHandler(handler)
    messages = [line for line in stream.getvalue().splitlines() if "deprecat" in line.lower()]
    messages += [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    assert not messages, "\n".join(messages)


def test_the_guard_sees_a_deprecation_message() -> None:
    """The capture works: the old argument name on a transformers causal LM is reported."""
    reference, _ = _convert("llama", 4)
    with pytest.raises(AssertionError, match="deprecated"), no_deprecation_messages(), torch.no_grad():
        reference(_tokens(1, 4), past_key_values=DynamicCache(), use_cache=True)


@pytest.mark.parametrize("family", ["dit", "llama"])
def test_forward_generate_and_save_log_no_deprecation(family: str, tmp_path) -> None:
    model = random_model() if family == "dit" else _convert("llama", 4)[1]
    ids = _tokens(2, 8) if family != "dit" else torch.randint(0, 63, (2, 8))
    with no_deprecation_messages(), torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.cache if hasattr(type(out), "cache") or "cache" in out else out[-1]
        model(ids[:, :4], cache=DynamicCache(), use_cache=True)
        model(input_ids=ids, noisy_input_ids=ids)
        model.generate(ids, max_new_tokens=8, do_sample=False)
        model.save_pretrained(tmp_path / "saved")
        type(model).from_pretrained(tmp_path / "saved")
    assert cache is not None


@pytest.mark.parametrize("family", ["dit", "llama"])
def test_the_old_cache_name_warns_like_transformers_models(family: str) -> None:
    """`past_key_values=` still works on our forward, with the FutureWarning transformers' own models give."""
    model = random_model() if family == "dit" else _convert("llama", 4)[1]
    ids = _tokens(1, 4) if family != "dit" else torch.randint(0, 63, (1, 4))
    with torch.no_grad():
        expected = model(ids, cache=DynamicCache(), use_cache=True).logits
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
            logits = model(ids, past_key_values=DynamicCache(), use_cache=True).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_a_training_step_logs_no_deprecation(tmp_path) -> None:
    with no_deprecation_messages():
        trainer = BD3LMTrainer(
            tiny_train_model(),
            tiny_training_args(tmp_path, max_steps=2),
            train_dataset=random_token_dataset(8),
            eval_dataset=random_token_dataset(4),
        )
        trainer.train()
        trainer.evaluate()
