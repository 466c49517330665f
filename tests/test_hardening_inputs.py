"""A catalogue of bad inputs to every public entry point (config, forward, generate, Trainer, the `bd3lm` command line,
`hub_upload.py`): each must fail at the call with a clear error that names the argument, never with an index error, a
NaN, a hang or a crash deep inside torch. Property-based tests then throw random shapes, dtypes, token ids, lengths
and sampler settings at `forward` and `generate`.

Cases already covered elsewhere (tests/test_configuration_bd3lm.py, test_modeling_bd3lm.py, test_generation_bd3lm.py,
test_trainer.py, test_data.py, test_cli.py, test_hub_upload.py) are not repeated here.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LogitsProcessor, TextStreamer

import hub_upload
from bd3lm_trainer import BD3LMTrainer
from bd3lm_trainer.cli import main as cli_main
from bd3lm_trainer.corpus import load_tokenizer
from modeling_bd3lm.sampling_bd3lm import SAMPLERS
from tests.conftest import (
    random_model,
    tiny_config,
    tiny_train_model,
    tiny_training_args,
)

VOCAB, MASK, BOS, PAD = 64, 63, 1, 0
L = torch.long


@functools.cache
def _model():
    """The tiny random model in eval mode (shared: no case mutates it)."""
    return random_model(bos_token_id=BOS, pad_token_id=PAD)


@functools.cache
def _time_conditioned():
    return random_model(time_conditioning=True)


def _ids(*shape: int, low: int = 2, high: int = MASK) -> torch.LongTensor:
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(0))


def _cache(rows: int, length: int) -> DynamicCache:
    cache = DynamicCache()
    _model()(input_ids=_ids(rows, length), cache=cache, use_cache=True)
    return cache


def _train(tmp: Path, rows: list, **kwargs) -> None:
    from datasets import Dataset

    args = tiny_training_args(tmp, max_steps=1, schedule_search=False)
    BD3LMTrainer(tiny_train_model(), args, train_dataset=Dataset.from_dict({"input_ids": rows}), **kwargs).train()


class _NaNScores(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores * float("nan")


class _BanEverything(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return torch.full_like(scores, float("-inf"))


@dataclass(frozen=True)
class Case:
    entry: str  # the public entry point
    bad: str  # what is wrong with the input
    call: Callable[[Path], Any]  # makes the call (given a scratch folder)
    error: type[Exception]  # expected exception type
    names: str  # regular expression the message must match: the argument it is about


x = _ids(2, 32)
CASES = [
    # ---- BD3LMConfig ----
    Case(
        "config",
        "hidden_dim=True (a bool is not a size)",
        lambda t: tiny_config(hidden_dim=True),
        ValueError,
        "`hidden_dim`",
    ),
    Case("config", "vocab_size as a string", lambda t: tiny_config(vocab_size="64"), ValueError, "`vocab_size`"),
    Case("config", "vocab_size=1 (only the mask)", lambda t: tiny_config(vocab_size=1), ValueError, "`vocab_size`"),
    Case("config", "n_heads=0", lambda t: tiny_config(n_heads=0), ValueError, "`n_heads`"),
    Case("config", "n_blocks=-1", lambda t: tiny_config(n_blocks=-1), ValueError, "`n_blocks`"),
    Case(
        "config",
        "odd head dimension",
        lambda t: tiny_config(hidden_dim=36, n_heads=4),
        ValueError,
        "hidden_dim.*n_heads",
    ),
    Case("config", "mlp_ratio=0", lambda t: tiny_config(mlp_ratio=0), ValueError, "`mlp_ratio`"),
    Case("config", "mlp_ratio=2.5", lambda t: tiny_config(mlp_ratio=2.5), ValueError, "`mlp_ratio`"),
    Case("config", "rope_theta=0", lambda t: tiny_config(rope_theta=0.0), ValueError, "`rope_theta`"),
    Case("config", "rope_theta as a string", lambda t: tiny_config(rope_theta="1e4"), ValueError, "`rope_theta`"),
    Case(
        "config", "initializer_range<0", lambda t: tiny_config(initializer_range=-1), ValueError, "`initializer_range`"
    ),
    Case("config", "mask_token_id=3.0", lambda t: tiny_config(mask_token_id=3.0), ValueError, "`mask_token_id`"),
    Case("config", "always_mask='yes'", lambda t: tiny_config(always_mask="yes"), ValueError, "`always_mask`"),
    Case("config", "ignore_bos=1", lambda t: tiny_config(ignore_bos=1), ValueError, "`ignore_bos`"),
    Case(
        "config",
        "sampling_eps_min=NaN",
        lambda t: tiny_config(sampling_eps_min=math.nan),
        ValueError,
        "`sampling_eps_min`",
    ),
    Case(
        "config",
        "sampling_eps_max as a string",
        lambda t: tiny_config(sampling_eps_max="1"),
        ValueError,
        "`sampling_eps_max`",
    ),
    Case("config", "dropout=NaN", lambda t: tiny_config(dropout=math.nan), ValueError, "`dropout`"),
    Case("config", "cond_dim=0", lambda t: tiny_config(cond_dim=0), ValueError, "`cond_dim`"),
    Case("config", "noise_schedule=None", lambda t: tiny_config(noise_schedule=None), ValueError, "`noise_schedule`"),
    # ---- forward ----
    Case("forward", "input_ids as a list", lambda t: _model()(input_ids=x.tolist()), TypeError, "`input_ids`"),
    Case("forward", "input_ids=None", lambda t: _model()(input_ids=None), TypeError, "`input_ids`"),
    Case("forward", "no tokens (2, 0)", lambda t: _model()(input_ids=_ids(2, 0)), ValueError, "`input_ids` is empty"),
    Case(
        "forward",
        "no rows (0, 8)",
        lambda t: _model()(input_ids=_ids(0, 8), labels=_ids(0, 8)),
        ValueError,
        "`input_ids` is empty",
    ),
    Case("forward", "1-D input_ids", lambda t: _model()(input_ids=x[0]), ValueError, "`input_ids`.*shape"),
    Case("forward", "int8 input_ids", lambda t: _model()(input_ids=x.to(torch.int8)), TypeError, "`input_ids`"),
    Case("forward", "bool input_ids", lambda t: _model()(input_ids=x.bool()), TypeError, "`input_ids`"),
    Case("forward", "negative id", lambda t: _model()(input_ids=x - 5), ValueError, "`input_ids` holds id -"),
    Case(
        "forward", "labels past the vocabulary", lambda t: _model()(input_ids=x, labels=x + 64), ValueError, "`labels`"
    ),
    Case(
        "forward",
        "negative labels other than -100",
        lambda t: _model()(input_ids=x, labels=x - 50),
        ValueError,
        "`labels`",
    ),
    Case("forward", "float labels", lambda t: _model()(input_ids=x, labels=x.float()), TypeError, "`labels`"),
    Case("forward", "labels as a list", lambda t: _model()(input_ids=x, labels=x.tolist()), TypeError, "`labels`"),
    Case(
        "forward", "labels of another shape", lambda t: _model()(input_ids=x, labels=x[:, :16]), ValueError, "`labels`"
    ),
    Case(
        "forward",
        "labels holding the mask token",
        lambda t: _model()(input_ids=x, labels=x.clamp_min(MASK)),
        ValueError,
        "`labels` contain the mask token",
    ),
    Case(
        "forward",
        "attention_mask of 0.5",
        lambda t: _model()(input_ids=x, attention_mask=torch.full((2, 32), 0.5)),
        ValueError,
        "`attention_mask`",
    ),
    Case(
        "forward",
        "attention_mask as a list",
        lambda t: _model()(input_ids=x, attention_mask=[[1] * 32] * 2),
        TypeError,
        "`attention_mask`",
    ),
    Case(
        "forward",
        "attention_mask one column short",
        lambda t: _model()(input_ids=x, attention_mask=torch.ones(2, 31)),
        ValueError,
        "`attention_mask`",
    ),
    Case(
        "forward",
        "1-D attention_mask",
        lambda t: _model()(input_ids=x, attention_mask=torch.ones(2)),
        ValueError,
        "`attention_mask`",
    ),
    Case(
        "forward",
        "attention_mask holding 2",
        lambda t: _model()(input_ids=x, labels=x, attention_mask=torch.full((2, 32), 2)),
        ValueError,
        "`attention_mask`",
    ),
    Case(
        "forward",
        "complex attention_mask",
        lambda t: _model()(input_ids=x, attention_mask=torch.ones(2, 32, dtype=torch.cfloat)),
        TypeError,
        "`attention_mask`",
    ),
    Case(
        "forward",
        "attention_mask not covering the cache",
        lambda t: _model()(input_ids=x[:, :4], cache=_cache(2, 8), attention_mask=torch.ones(2, 4)),
        ValueError,
        "`attention_mask`.*8 cached",
    ),
    Case(
        "forward",
        "integer noise_levels",
        lambda t: _model()(input_ids=x, noise_levels=torch.ones(2, 8, dtype=L)),
        TypeError,
        "`noise_levels`",
    ),
    Case(
        "forward",
        "noise_levels as a list",
        lambda t: _model()(input_ids=x, noise_levels=[[0.5] * 8] * 2),
        TypeError,
        "`noise_levels`",
    ),
    Case(
        "forward",
        "NaN noise_levels",
        lambda t: _model()(input_ids=x, noise_levels=torch.full((2, 8), math.nan)),
        ValueError,
        "`noise_levels`",
    ),
    Case(
        "forward",
        "masks at noise level 0",
        lambda t: _model()(
            input_ids=x, labels=x, noise_levels=torch.zeros(2, 8), noisy_input_ids=torch.full_like(x, MASK)
        ),
        ValueError,
        "`noise_levels`",
    ),
    Case(
        "forward",
        "masks at noise level 1e-38 (weight overflows)",
        lambda t: _model()(
            input_ids=x, labels=x, noise_levels=torch.full((2, 8), 1e-38), noisy_input_ids=torch.full_like(x, MASK)
        ),
        ValueError,
        "`noise_levels`",
    ),
    Case(
        "forward",
        "float noisy_input_ids",
        lambda t: _model()(input_ids=x, noisy_input_ids=x.float()),
        TypeError,
        "`noisy_input_ids`",
    ),
    Case(
        "forward",
        "noisy_input_ids past the vocabulary",
        lambda t: _model()(input_ids=x, noisy_input_ids=x + 64),
        ValueError,
        "`noisy_input_ids`",
    ),
    Case(
        "forward",
        "noisy_input_ids with a cache",
        lambda t: _model()(input_ids=x, noisy_input_ids=x, cache=DynamicCache()),
        ValueError,
        "noisy_input_ids.*`cache`",
    ),
    Case("forward", "cache not a Cache", lambda t: _model()(input_ids=x[:, :4], cache=object()), TypeError, "`cache`"),
    Case(
        "forward", "legacy tuple cache", lambda t: _model()(input_ids=x[:, :4], cache=((x, x),)), TypeError, "`cache`"
    ),
    Case(
        "forward",
        "cache of another batch",
        lambda t: _model()(input_ids=x[:, :4], cache=_cache(1, 4)),
        ValueError,
        "`cache` holds 1 rows",
    ),
    Case(
        "forward",
        "cache and past_key_values both",
        lambda t: _model()(input_ids=x[:, :4], cache=DynamicCache(), past_key_values=DynamicCache()),
        ValueError,
        "`cache`",
    ),
    Case(
        "forward",
        "window past model_length through the cache",
        lambda t: _model()(input_ids=x[:, :8], cache=_cache(2, 28)),
        ValueError,
        "model_length",
    ),
    Case("forward", "generator=3", lambda t: _model()(input_ids=x, labels=x, generator=3), TypeError, "`generator`"),
    Case(
        "forward",
        "misspelt argument noise_level=",
        lambda t: _model()(input_ids=x, noise_level=torch.ones(2, 8)),
        TypeError,
        "noise_level",
    ),
    Case(
        "forward",
        "inputs_embeds",
        lambda t: _model()(input_ids=x, inputs_embeds=torch.zeros(2, 32, 64)),
        ValueError,
        "`inputs_embeds`",
    ),
    Case(
        "forward", "head_mask", lambda t: _model()(input_ids=x, head_mask=torch.ones(2, 4)), ValueError, "`head_mask`"
    ),
    Case(
        "forward",
        "timesteps of the wrong shape",
        lambda t: _time_conditioned()(input_ids=x, timesteps=torch.ones(5, 3)),
        ValueError,
        "`timesteps`",
    ),
    Case(
        "forward",
        "timesteps as a list",
        lambda t: _time_conditioned()(input_ids=x, timesteps=[0.5, 0.5]),
        TypeError,
        "`timesteps`",
    ),
    # the denoiser trusts its inputs (the wrapper checks them once, for every kind); its own signature is strict
    Case(
        "BD3LMModel.forward",
        "misspelt argument noise_level=",
        lambda t: _model().backbone(input_ids=x, noise_level=torch.ones(2, 8)),
        TypeError,
        "noise_level",
    ),
    # ---- generate ----
    Case(
        "generate",
        "prompt as a list",
        lambda t: _model().generate(x.tolist(), max_new_tokens=4),
        TypeError,
        "`input_ids`",
    ),
    Case("generate", "no rows", lambda t: _model().generate(_ids(0, 5), max_new_tokens=4), ValueError, "`input_ids`"),
    Case("generate", "1-D prompt", lambda t: _model().generate(x[0], max_new_tokens=4), ValueError, "`input_ids`"),
    Case(
        "generate",
        "prompt ids past the vocabulary",
        lambda t: _model().generate(x + 64, max_new_tokens=4),
        ValueError,
        "`input_ids`",
    ),
    Case(
        "generate",
        "attention_mask as a list",
        lambda t: _model().generate(x[:, :5], attention_mask=[[1] * 5] * 2, max_new_tokens=4),
        TypeError,
        "`attention_mask`",
    ),
    Case(
        "generate",
        "attention_mask holding 2",
        lambda t: _model().generate(x[:, :5], attention_mask=torch.full((2, 5), 2), max_new_tokens=4),
        ValueError,
        "`attention_mask`",
    ),
    Case(
        "generate",
        "a row of padding only",
        lambda t: _model().generate(x[:, :5], attention_mask=torch.tensor([[0] * 5, [1] * 5]), max_new_tokens=4),
        ValueError,
        "`attention_mask`.*all padding",
    ),
    Case(
        "generate",
        "pad_token_id past the vocabulary",
        lambda t: _model().generate(x[:, :5], pad_token_id=100, max_new_tokens=4),
        ValueError,
        "`pad_token_id`",
    ),
    Case(
        "generate",
        "bos_token_id past the vocabulary",
        lambda t: _model().generate(bos_token_id=100, max_new_tokens=4),
        ValueError,
        "`bos_token_id`",
    ),
    Case(
        "generate",
        "eos_token_id past the vocabulary",
        lambda t: _model().generate(x[:, :5], eos_token_id=100, max_new_tokens=4),
        ValueError,
        "`eos_token_id`",
    ),
    Case(
        "generate",
        "negative eos_token_id",
        lambda t: _model().generate(x[:, :5], eos_token_id=-1, max_new_tokens=4),
        ValueError,
        "`eos_token_id`",
    ),
    Case(
        "generate",
        "mask_token_id past the vocabulary",
        lambda t: _model().generate(x[:, :5], mask_token_id=100, max_new_tokens=4),
        ValueError,
        "`mask_token_id`",
    ),
    Case(
        "generate",
        "temperature=inf",
        lambda t: _model().generate(x[:, :5], do_sample=True, temperature=math.inf, max_new_tokens=4),
        ValueError,
        "`temperature`",
    ),
    Case(
        "generate",
        "temperature=NaN",
        lambda t: _model().generate(x[:, :5], do_sample=True, temperature=math.nan, max_new_tokens=4),
        ValueError,
        "`temperature`",
    ),
    Case(
        "generate",
        "repetition_penalty=inf",
        lambda t: _model().generate(x[:, :5], repetition_penalty=math.inf, max_new_tokens=4),
        ValueError,
        "`repetition_penalty`",
    ),
    Case(
        "generate",
        "seed past 64 bits",
        lambda t: _model().generate(x[:, :5], seed=2**70, max_new_tokens=4),
        ValueError,
        "`seed`",
    ),
    Case(
        "generate",
        "top_p=NaN",
        lambda t: _model().generate(x[:, :5], do_sample=True, top_p=math.nan, max_new_tokens=4),
        ValueError,
        "`top_p`",
    ),
    Case(
        "generate",
        "max_time=0",
        lambda t: _model().generate(x[:, :5], max_time=0, max_new_tokens=4),
        ValueError,
        "`max_time`",
    ),
    Case(
        "generate",
        "max_new_tokens=True",
        lambda t: _model().generate(x[:, :5], max_new_tokens=True),
        ValueError,
        "`max_new_tokens`",
    ),
    Case(
        "generate",
        "contrastive search (penalty_alpha)",
        lambda t: _model().generate(x[:, :5], penalty_alpha=0.6, max_new_tokens=4),
        ValueError,
        "`penalty_alpha`",
    ),
    Case(
        "generate",
        "num_return_sequences=2 without sampling",
        lambda t: _model().generate(x[:, :5], num_return_sequences=2, max_new_tokens=4),
        ValueError,
        "num_return_sequences",
    ),
    Case(
        "generate",
        "a processor that returns NaN",
        lambda t: _model().generate(x[:, :5], logits_processor=[_NaNScores()], max_new_tokens=4),
        ValueError,
        "`logits_processor`",
    ),
    Case(
        "generate",
        "a processor that bans every token",
        lambda t: _model().generate(x[:, :5], logits_processor=[_BanEverything()], do_sample=True, max_new_tokens=4),
        ValueError,
        "`logits_processor`",
    ),
    Case(
        "generate",
        "one processor, not a list",
        lambda t: _model().generate(x[:, :5], logits_processor=_NaNScores(), max_new_tokens=4),
        TypeError,
        "`logits_processor`",
    ),
    Case(
        "generate",
        "a processor that is not callable",
        lambda t: _model().generate(x[:, :5], logits_processor=[3], max_new_tokens=4),
        TypeError,
        "`logits_processor`",
    ),
    Case(
        "generate",
        "one criterion, not a list",
        lambda t: _model().generate(x[:, :5], stopping_criteria=lambda i, s: True, max_new_tokens=4),
        TypeError,
        "`stopping_criteria`",
    ),
    Case(
        "generate",
        "a criterion answering for 7 rows",
        lambda t: _model().generate(
            x[:, :5], stopping_criteria=[lambda i, s: torch.ones(7, dtype=torch.bool)], max_new_tokens=4
        ),
        ValueError,
        "`stopping_criteria`",
    ),
    Case(
        "generate",
        "a streamer without put()",
        lambda t: _model().generate(x[:, :5], streamer=object(), max_new_tokens=4),
        TypeError,
        "`streamer`",
    ),
    Case(
        "generate",
        "tokenizer=3",
        lambda t: _model().generate(x[:, :5], stop_strings="a", tokenizer=3, max_new_tokens=4),
        TypeError,
        "`tokenizer`",
    ),
    Case(
        "generate",
        "a tokenizer larger than the model",
        lambda t: _model().generate(x[:, :5], tokenizer=load_tokenizer(), max_new_tokens=4),
        ValueError,
        "`tokenizer`.*8192 tokens",
    ),
    Case(
        "generate",
        "a streamer whose tokenizer is larger than the model",
        lambda t: _model().generate(x[:, :5], streamer=TextStreamer(load_tokenizer()), max_new_tokens=4),
        ValueError,
        "streamer's tokenizer",
    ),
    Case(
        "generate",
        "generation_config as a dict",
        lambda t: _model().generate(x[:, :5], generation_config={"max_new_tokens": 4}),
        TypeError,
        "`generation_config`",
    ),
    # ---- BD3LMTrainer and BD3LMTrainingArguments ----
    Case(
        "Trainer",
        "args as a dict",
        lambda t: BD3LMTrainer(tiny_train_model(), {"output_dir": str(t)}),
        TypeError,
        "`args`",
    ),
    Case(
        "Trainer",
        "model path that does not exist",
        lambda t: BD3LMTrainer(str(t / "no" / "such" / "model"), tiny_training_args(t)),
        ValueError,
        "`model`",
    ),
    Case(
        "Trainer",
        "peft_config as a string",
        lambda t: BD3LMTrainer(tiny_train_model(), tiny_training_args(t), peft_config="lora"),
        TypeError,
        "`peft_config`",
    ),
    Case(
        "Trainer",
        "a tokenizer larger than the model",
        lambda t: BD3LMTrainer(tiny_train_model(), tiny_training_args(t), processing_class=load_tokenizer()),
        ValueError,
        "`processing_class`",
    ),
    Case("Trainer", "an empty train_dataset", lambda t: _train(t, []), ValueError, "`train_dataset`"),
    Case("Trainer", "token ids past the vocabulary", lambda t: _train(t, [[70] * 32] * 4), ValueError, "`input_ids`"),
    Case(
        "Trainer",
        "data holding the mask token",
        lambda t: _train(t, [[MASK] * 32] * 4),
        ValueError,
        "`labels` contain the mask token",
    ),
    Case("Trainer", "empty sequences", lambda t: _train(t, [[]] * 4), ValueError, "`input_ids`"),
    Case("Trainer", "float token ids", lambda t: _train(t, [[0.5] * 32] * 4), TypeError, "`input_ids`"),
    Case("Trainer", "untokenized strings", lambda t: _train(t, [["a"] * 32] * 4), TypeError, "`input_ids`"),
    Case("Trainer", "nested token lists", lambda t: _train(t, [[[1, 2]] * 16] * 4), TypeError, "`input_ids`"),
    Case(
        "TrainingArguments",
        "nan_loss_policy='ignore'",
        lambda t: tiny_training_args(t, nan_loss_policy="ignore"),
        ValueError,
        "`nan_loss_policy`",
    ),
    Case(
        "TrainingArguments",
        "noise_interval with NaN",
        lambda t: tiny_training_args(t, noise_interval=[math.nan, 0.5]),
        ValueError,
        "`noise_interval`",
    ),
    Case(
        "TrainingArguments",
        "noise_interval of 3 numbers",
        lambda t: tiny_training_args(t, noise_interval=[0.1, 0.2, 0.3]),
        ValueError,
        "`noise_interval`",
    ),
    Case(
        "TrainingArguments",
        "schedule_search_step as a string",
        lambda t: tiny_training_args(t, schedule_search_step="0.1"),
        ValueError,
        "`schedule_search_step`",
    ),
    Case(
        "TrainingArguments",
        "schedule_search_batches=1.5",
        lambda t: tiny_training_args(t, schedule_search_batches=1.5),
        ValueError,
        "`schedule_search_batches`",
    ),
    Case(
        "TrainingArguments",
        "ema_decay=NaN",
        lambda t: tiny_training_args(t, ema_decay=math.nan),
        ValueError,
        "`ema_decay`",
    ),
    Case(
        "TrainingArguments",
        "a width of 0",
        lambda t: tiny_training_args(t, schedule_search_widths=[0.0, 0.5]),
        ValueError,
        "`schedule_search_widths`",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.entry}: {c.bad}" for c in CASES])
def test_bad_input_fails_clearly_naming_the_argument(case: Case, tmp_path: Path):
    with _no_hang(60), pytest.raises(case.error, match=case.names) as raised:
        case.call(tmp_path)
    assert type(raised.value) in (ValueError, TypeError)  # never a subclass from deep inside a library


# ----------------------------------------------------------------------------------------------------------------------
# Command lines: `bd3lm ...` and `python hub_upload.py ...` exit with 2 and one line naming the option


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """A model saved with the embedded tokenizer, the same with truncated weights, a model whose vocabulary is smaller
    than its tokenizer, an empty folder and a small text file."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = load_tokenizer()
    model = random_model(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    for name in ("model", "truncated"):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    random_model().save_pretrained(root / "small-vocab")
    tokenizer.save_pretrained(root / "small-vocab")
    (root / "empty").mkdir()
    (root / "data.txt").write_text("In the beginning God created the heaven and the earth.\n" * 40)
    folders = {name: str(root / name) for name in ("model", "truncated", "small-vocab", "empty")}
    return folders | {"data": str(root / "data.txt"), "root": str(root)}


@dataclass(frozen=True)
class CommandCase:
    entry: str  # "bd3lm" or "hub_upload"
    argv: tuple[str, ...]  # {model}, {data}, ... are replaced by the fixture's folders
    names: str  # regular expression the error line must match
    xfail: str | None = None  # the source still gives a poor error: reason, for the lead


FAST = ("--dataset", "{data}", "--output-dir", "{root}/out", "--model-length", "32", "--max-steps", "1")
COMMANDS = [
    CommandCase("bd3lm", ("train", "--model-length", "-4"), "--model-length"),
    CommandCase("bd3lm", ("train", "--eval-steps", "0"), "--eval-steps"),
    CommandCase("bd3lm", ("train", "--save-steps", "0"), "--save-steps"),
    CommandCase("bd3lm", ("train", "--eval-batches", "0"), "--eval-batches"),
    CommandCase("bd3lm", ("train", *FAST, "--search-batches", "0"), "search[-_]batches"),
    CommandCase("bd3lm", ("train", *FAST, "--warmup-steps", "-1"), "warmup[-_]steps"),
    CommandCase("bd3lm", ("train", *FAST, "--noise-interval", "0.9", "0.1"), "noise[-_]interval"),
    CommandCase("bd3lm", ("generate", "{model}", "--top-p", "1.5"), "top[-_]p"),
    CommandCase("bd3lm", ("generate", "{model}", "--temperature", "0"), "temperature"),
    CommandCase("bd3lm", ("generate", "{model}", "--num-steps", "0"), "num[-_]steps"),
    CommandCase("bd3lm", ("generate", "{model}", "--top-k", "-1"), "top[-_]k"),
    CommandCase(
        "bd3lm",
        ("generate", "{model}", "--sampler", "ddpm", "--confidence-threshold", "0.5"),
        "confidence[-_]threshold",
    ),
    CommandCase("bd3lm", ("generate", "{model}", "--tokens-per-step", "0"), "tokens[-_]per[-_]step"),
    CommandCase("bd3lm", ("generate", "{model}", "--prompt", "word " * 60), "prompt.*model_length"),
    CommandCase("bd3lm", ("generate", "{truncated}"), "truncated or corrupted"),
    CommandCase("bd3lm", ("generate", "{small-vocab}"), "tokenizer.*8192 tokens.*vocab_size"),
    CommandCase("bd3lm", ("upload", "{root}/missing", "user/name", "--dry-run"), "folder=.*does not exist"),
    CommandCase(
        "bd3lm", ("eval", "{root}/missing", "--dataset", "{data}"), "missing.*(does not exist|neither a folder)"
    ),
    CommandCase("hub_upload", ("{model}", "user/name", "--dry-run", "--checkpoint", "latest"), "checkpoint='latest'"),
    CommandCase("hub_upload", ("{model}", "user/name", "--dry-run", "--tokenizer", "{root}/missing"), "tokenizer="),
    CommandCase("hub_upload", ("{model}", "user/name", "--dry-run", "--base-model", "bad id!"), "base_model="),
    CommandCase("hub_upload", ("{truncated}", "user/name", "--dry-run", "--nfe-tokens", "0"), "safetensors"),
    CommandCase(
        "hub_upload",
        ("{model}", "user/name", "--dry-run", "--nfe-tokens", "0", "--max-shard-size", "lots"),
        "max[-_]shard[-_]size",
    ),
    CommandCase("hub_upload", ("{model}", "user/name", "--dry-run", "--nfe-tokens", "-5"), "nfe[-_]tokens"),
    CommandCase(
        "hub_upload", ("{model}", "user/name", "--dry-run", "--nfe-tokens", "0", "--dataset", "bad id!"), "dataset"
    ),
]


def _command_param(case: CommandCase):
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, marks=marks, id=f"{case.entry} {' '.join(case.argv)[:60]}")


@pytest.mark.parametrize("case", [_command_param(c) for c in COMMANDS])
def test_bad_command_line_exits_2_with_one_line_naming_the_option(case: CommandCase, folders):
    argv = [arg.format(**folders) if "{" in arg else arg for arg in case.argv]
    main = cli_main if case.entry == "bd3lm" else hub_upload.main
    err, out = io.StringIO(), io.StringIO()
    with _no_hang(120), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    errors = [line for line in err.getvalue().splitlines() if "error" in line.lower() or "Traceback" in line]
    assert code == 2, err.getvalue()[-2000:]
    assert len(errors) == 1 and "Traceback" not in err.getvalue(), err.getvalue()[-2000:]
    assert re.search(case.names, errors[0]), errors[0]


@pytest.mark.parametrize(
    "argv, option",
    [
        (("train", "--preset", "huge"), "--preset"),
        (("train", "--max-steps", "abc"), "--max-steps"),
        (("generate", "x", "--num-samples", "two"), "--num-samples"),
        (("eval", "x", "--nope"), "--nope"),
    ],
)
def test_values_argparse_rejects_exit_2_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as raised:
        cli_main(list(argv))
    assert raised.value.code == 2
    assert option in capsys.readouterr().err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------------------------------
# Property tests: random input to forward and generate gives a valid result or a clear ValueError/TypeError


@contextlib.contextmanager
def _no_hang(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""

    def timeout(signum, frame):
        raise AssertionError(f"hung for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# Each property test first draws which aspects of the call to break (none, one or two), then draws valid values for
# the others and invalid ones for those: so that valid calls (which must give finite, well-formed results) and each
# kind of mistake are both exercised.
VALID_ID_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8]
BAD_ID_DTYPES = [torch.int8, torch.float32, torch.bool]
FORWARD_ASPECTS = ["empty", "dtype", "ids", "length", "labels", "noise_levels", "noisy_input_ids", "attention_mask"]


def _draw_ids(data, rows: int, length: int, g: torch.Generator, broken: bool, with_mask: bool = True) -> torch.Tensor:
    if broken:
        low, high = data.draw(st.sampled_from([(-3, MASK), (MASK - 2, VOCAB + 6), (VOCAB, 300)]), label="bad ids")
    else:
        low, high = 0, VOCAB if with_mask else MASK
    return torch.randint(low, high, (rows, length), generator=g)


def _draw_dtype(data, broken: bool) -> torch.dtype:
    return data.draw(st.sampled_from(BAD_ID_DTYPES if broken else VALID_ID_DTYPES), label="dtype")


def _is_clear(error: Exception) -> bool:
    """A message that names something: an argument in backticks, or the option/field it is about."""
    message = str(error)
    return len(message) > 15 and ("`" in message or "must" in message or "got" in message)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.data())
def test_forward_on_random_input_is_valid_or_a_clear_error(data):
    model = _model()
    broken = data.draw(st.one_of(st.just(set()), st.sets(st.sampled_from(FORWARD_ASPECTS), max_size=2)), label="broken")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    rows = 0 if "empty" in broken else data.draw(st.integers(1, 3), label="rows")
    mode = data.draw(st.sampled_from(["sample", "loss", "loss at given t", "x_t", "x_t with loss"]), label="mode")
    if "length" in broken:  # not whole blocks (vectorised modes) or past model_length
        length = data.draw(st.sampled_from([33, 40, 64] + ([5, 13, 30] if mode != "sample" else [])), label="length")
    else:
        length = data.draw(st.integers(1, 8), label="blocks") * (4 if mode != "sample" else 1)
    ids = _draw_ids(data, rows, length, g, "ids" in broken, with_mask=mode == "sample")
    ids = ids.to(_draw_dtype(data, "dtype" in broken))
    kwargs: dict[str, Any] = {}
    if "loss" in mode or "labels" in broken:
        labels = _draw_ids(data, rows, length, g, "labels" in broken, with_mask=False)
        kwargs["labels"] = labels.masked_fill(torch.rand(rows, length, generator=g) < 0.2, -100)
    if mode in ("loss at given t", "x_t with loss") or "noise_levels" in broken:
        blocks = length // 4
        if "noise_levels" in broken:
            kind = data.draw(st.sampled_from(["shape", "range", "dtype"]), label="bad noise levels")
            levels = {
                "shape": torch.rand(rows, blocks + 1, generator=g),
                "range": torch.full((rows, blocks), data.draw(st.sampled_from([-0.5, 1.5, math.nan, math.inf]))),
                "dtype": torch.ones(rows, blocks, dtype=torch.long),
            }[kind]
        else:  # in (0, 1]: with noisy_input_ids given, a masked block needs t > 0
            levels = 1.0 - torch.rand(rows, blocks, generator=g) * data.draw(st.floats(0, 1), label="t range")
        kwargs["noise_levels"] = levels
    if mode.startswith("x_t") or "noisy_input_ids" in broken:
        if "noisy_input_ids" in broken:
            noisy = _draw_ids(data, rows, length + data.draw(st.sampled_from([0, 4])), g, True)
        else:
            clean = ids.long().clamp(0, MASK - 1)
            noisy = torch.where(torch.rand(rows, length, generator=g) < 0.5, torch.full_like(clean, MASK), clean)
        kwargs["noisy_input_ids"] = noisy
    if "attention_mask" in broken or data.draw(st.booleans(), label="attention mask"):
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[:, : data.draw(st.integers(0, length), label="padding")] = 0
        if "attention_mask" in broken:
            kind = data.draw(st.sampled_from(["values", "shape", "list"]), label="bad attention mask")
            mask = {"values": mask * 2, "shape": mask[:, 1:], "list": mask.tolist()}[kind]
        else:
            mask = mask.to(data.draw(st.sampled_from([torch.long, torch.bool, torch.float32]), label="mask dtype"))
        kwargs["attention_mask"] = mask
    with _no_hang(30):
        try:
            out = model(input_ids=ids, return_dict=True, **kwargs)
        except (ValueError, TypeError) as error:
            assert _is_clear(error), repr(error)
            event(f"{type(error).__name__}: {str(error)[:40]}")
            return
    event("valid result")
    assert out.logits.shape == (rows, length, VOCAB) and bool(torch.isfinite(out.logits).all())
    if "labels" in kwargs:
        assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(out.token_loss).all())


# option -> (valid values, invalid values)
GENERATE_OPTIONS = {
    "max_new_tokens": ([1, 3, 9, 16], [-1, 0, 2.5]),
    "sampler": (sorted(SAMPLERS), ["beam", ""]),
    "num_steps": ([1, 3, 20], [-1, 0]),
    "do_sample": ([True, False], [1, "yes"]),
    "temperature": ([1e-6, 0.7, 50.0], [0.0, -1.0, math.inf, math.nan]),
    "top_k": ([0, 1, 5, 10**6], [-1, 2.5]),
    "top_p": ([0.3, 1.0], [0.0, 1.5, math.nan]),
    "nucleus_p": ([1e-9, 0.9], [0.0, 2.0]),
    "tokens_per_step": ([1, 3, 100], [0]),
    "repetition_penalty": ([0.5, 1.3], [0.0, math.inf]),
    "use_cache": ([True, False], [None]),
    "seed": ([0, -1, 2**40], [2**70, 1.5]),
    "eos_token_id": ([5, [5, 6]], [VOCAB + 5, -1, []]),
    "pad_token_id": ([0, 2], [VOCAB + 5]),
    "entropy_stop": ([0.5, 3.0], [-1.0]),
    "max_time": ([1e-9, 10.0], [0.0, -1.0]),
    "prompt": (["left padded", "unpadded", "none"], ["right padded", "mask values", "mask shape", "empty", "ids"]),
}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.data())
def test_generate_on_random_input_and_settings_is_valid_or_a_clear_error(data):
    model = _model()
    options = sorted(GENERATE_OPTIONS)
    broken = data.draw(st.one_of(st.just(set()), st.sets(st.sampled_from(options), max_size=2)), label="broken")
    used = data.draw(st.sets(st.sampled_from(options), min_size=2, max_size=8), label="used") | broken
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    values = {name: data.draw(st.sampled_from(GENERATE_OPTIONS[name][name in broken]), label=name) for name in used}
    prompt = values.pop("prompt", "unpadded")
    kwargs: dict[str, Any] = dict(values)
    kwargs.setdefault("max_new_tokens", 8)
    if kwargs.get("sampler") not in (None, "confidence_threshold") or "tokens_per_step" in kwargs:
        kwargs.pop("confidence_threshold", None)
    if kwargs.get("do_sample") is False:
        kwargs.pop("num_return_sequences", None)
    rows, length = data.draw(st.integers(1, 3), label="rows"), data.draw(st.integers(1, 14), label="prompt length")
    if prompt != "none":
        ids = _draw_ids(data, 0 if prompt == "empty" else rows, length, g, prompt == "ids", with_mask=False)
        kwargs["input_ids"] = ids.to(_draw_dtype(data, False))
        if prompt != "unpadded":
            lengths = torch.randint(1, length + 1, (ids.shape[0],), generator=g)
            mask = torch.arange(length)[None, :] >= (length - lengths)[:, None]
            mask = {
                "left padded": mask,
                "empty": mask,
                "ids": mask,
                "right padded": mask.flip(1),
                "mask values": mask.long() * 2,
                "mask shape": mask[:, 1:],
            }[prompt]
            kwargs["attention_mask"] = mask
    with _no_hang(60):
        try:
            out = model.generate(**kwargs)
        except (ValueError, TypeError) as error:
            assert _is_clear(error), repr(error)
            event(f"{type(error).__name__}: {str(error)[:40]}")
            return
    event("valid result")
    prompt_rows, prompt_length = (rows, length) if "input_ids" in kwargs else (1, 1)
    assert out.dim() == 2 and out.shape[0] == prompt_rows and out.dtype == torch.long
    assert bool(((out >= 0) & (out < VOCAB)).all())
    new = out[:, prompt_length:]
    assert new.shape[1] <= kwargs["max_new_tokens"]
    assert not bool((new == MASK).any())  # a finished sample never holds the mask token (padding is PAD here)


def test_the_catalogue_covers_every_entry_point():
    entries = {case.entry for case in CASES} | {case.entry for case in COMMANDS}
    assert {"config", "forward", "generate", "Trainer", "TrainingArguments", "bd3lm", "hub_upload"} <= entries
