"""`logits_to_keep`: a sampling call projects on the vocabulary only the positions that are read (issue 25 item 5).

The forward takes transformers' convention (None or 0: every position; n: the last n; a 1-D index tensor: those
positions, in that order), applied to the hidden states BEFORE the output head, for the DiT and a converted causal LM.
`generate()` asks each call for the positions it reads; the tests check that this changes no token (greedy and seeded
sampling, every mode, batch 1 and a left-padded batch, cached, uncached and beyond `model_length`) and no kept logit
(1e-6), against the same generation with every position projected and the unread ones dropped afterwards, and that the
head really sees fewer rows (a forward hook on it: that test fails when the reduction is removed)."""

from __future__ import annotations

import pytest
import torch

from modeling_bd3lm import BD3LMForMaskedDiffusion
from modeling_bd3lm.causal_backbone_bd3lm import CausalLMDenoiser
from modeling_bd3lm.denoiser_bd3lm import keep_positions
from tests.conftest import random_model
from tests.test_causal_backbone import _convert
from tests.test_decoding_modes import _padded_prompts


def _project_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """The code without the reduction: every call projects every position, the unread ones are dropped afterwards."""
    forward = BD3LMForMaskedDiffusion.forward
    causal_pass = CausalLMDenoiser.causal_pass

    def full_forward(self, *args, logits_to_keep=None, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = keep_positions(out.logits, logits_to_keep)
        return out

    def full_causal_pass(self, input_ids, attention_mask=None, cache=None, use_cache=True, logits_to_keep=None, **kw):
        out = causal_pass(self, input_ids, attention_mask, cache, use_cache, None, **kw)
        out.logits = keep_positions(out.logits, logits_to_keep)
        return out

    monkeypatch.setattr(BD3LMForMaskedDiffusion, "forward", full_forward)
    monkeypatch.setattr(CausalLMDenoiser, "causal_pass", full_causal_pass)


def _head(model: BD3LMForMaskedDiffusion) -> torch.nn.Module:
    return model.backbone.output_layer.linear if model.config.denoiser_type == "dit" else model.backbone.lm_head


def _head_rows(model: BD3LMForMaskedDiffusion, run) -> list[int]:
    """The number of positions (per batch row) the output head projects in each network call of `run()`."""
    rows: list[int] = []
    handle = _head(model).register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    try:
        run()
    finally:
        handle.remove()
    return rows


def _dit() -> BD3LMForMaskedDiffusion:
    return random_model(0, vocab_size=64)


def _llama() -> BD3LMForMaskedDiffusion:
    return _convert("llama", 4)[1]


def _prompts(model: BD3LMForMaskedDiffusion, batch: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    prompts, attention = _padded_prompts()
    prompts = prompts % (model.config.mask_token_id - 3) + 3
    prompts = prompts.masked_fill(attention == 0, 0)
    return prompts[:batch], attention[:batch]


# ----------------------------------------------------------------------------------------------------------------------
# The forward


@pytest.mark.parametrize("build", [_dit, _llama], ids=["dit", "llama"])
def test_the_kept_logits_are_those_of_the_full_projection(build):
    model = build()
    ids, mask = _prompts(model, 3)
    full = model(input_ids=ids, attention_mask=mask).logits
    for keep in (1, 4, torch.tensor([0, 5, 2]), torch.tensor([], dtype=torch.long)):
        kept = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        assert kept.shape[1] == (keep if isinstance(keep, int) else len(keep))
        torch.testing.assert_close(kept, keep_positions(full, keep), rtol=0, atol=1e-6)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, logits_to_keep=0).logits, full)
    if model.denoiser.predicts_next_token:
        causal = model.causal_forward(ids, attention_mask=mask, use_cache=False).logits
        kept = model.causal_forward(ids, attention_mask=mask, use_cache=False, logits_to_keep=torch.tensor([4, 1]))
        torch.testing.assert_close(kept.logits, causal[:, [4, 1]], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("keep", "message"),
    [(-1, "an int >= 0"), (True, "an int >= 0"), (torch.tensor([[0]]), "1-D integer"), (torch.tensor([6]), "outside")],
)
def test_bad_logits_to_keep_gets_a_clear_error(keep, message):
    model = _dit()
    ids, mask = _prompts(model, 1)
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, attention_mask=mask, logits_to_keep=keep)
    with pytest.raises(ValueError, match="sampling pass"):
        model(input_ids=ids[:, :4], noisy_input_ids=ids[:, :4], logits_to_keep=1)


# ----------------------------------------------------------------------------------------------------------------------
# generate(): the same tokens and kept logits, fewer rows through the head

CASES = [
    ("dit", "diffusion", {}),
    ("dit", "diffusion", {"use_cache": False}),
    ("llama", "diffusion", {}),
    ("llama", "diffusion", {"use_cache": False}),
    ("llama", "autoregressive", {}),
    ("llama", "draft_verify", {"draft_variant": "two_pass"}),
    ("llama", "draft_verify", {"draft_variant": "one_forward"}),
]
CASE_IDS = ["dit", "dit-uncached", "llama", "llama-uncached", "autoregressive", "two_pass", "one_forward"]


@pytest.mark.parametrize(("family", "mode", "extra"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("batch", [1, 3])
def test_generation_is_unchanged_by_the_reduction(family, mode, extra, do_sample, batch, monkeypatch):
    model = _dit() if family == "dit" else _llama()
    ids, mask = _prompts(model, batch)
    # beyond model_length (32 for the DiT, 16 for the Llama): the window slides (diffusion), the clean stream runs on
    kwargs = dict(max_new_tokens=40 if family == "dit" else 24, do_sample=do_sample, eos_token_id=None)
    kwargs.update(generation_mode=mode, return_dict_in_generate=True, output_logits=mode == "diffusion", **extra)
    if do_sample:
        kwargs.update(seed=list(range(3, 3 + batch)), temperature=1.3)
    reduced = model.generate(ids, attention_mask=mask, **kwargs)
    _project_everything(monkeypatch)
    full = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(reduced.sequences, full.sequences)
    assert torch.equal(reduced.nfe, full.nfe)
    if mode == "diffusion":
        assert len(reduced.logits) == len(full.logits)
        for got, expected in zip(reduced.logits, full.logits, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize(("family", "mode", "extra"), CASES, ids=CASE_IDS)
def test_the_head_projects_only_the_positions_that_are_read(family, mode, extra, monkeypatch):
    """Rows through the output head per call. Diffusion: the block's k (under the shift the k outputs one earlier, the
    last committed one included: k - 1 when it comes from the cache), whatever the committed tokens run along.
    Autoregressive: 1. Two-pass: k - 1 (draft) then k (verify). One-forward: the m + 1 verify positions and k - 1 per
    group. Each fails with every position projected (the first call runs the prompt; the draft call reads k - 1 of k;
    each group's last position is unread)."""
    model = _dit() if family == "dit" else _llama()
    k = model.config.block_size
    ids, mask = _prompts(model, 3)
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, generation_mode=mode, **extra)

    def rows() -> list[int]:
        return _head_rows(model, lambda: model.generate(ids, attention_mask=mask, **kwargs))

    reduced = rows()
    if mode == "diffusion":
        cached_shift = family == "llama" and extra.get("use_cache", True)
        assert set(reduced) <= ({k, k - 1} if cached_shift else {k}), reduced
    elif mode == "autoregressive":
        assert set(reduced) == {1}
    elif extra["draft_variant"] == "two_pass":
        assert reduced[0] == 1 and set(reduced[1::2]) == {k - 1} and set(reduced[2::2]) == {k}, reduced
    else:
        assert reduced[0] == 1 and reduced[1] == 1 + 1 * (k - 1), reduced  # no drafts yet: the seed, one group
        assert set(reduced[2:]) == {k + k * (k - 1)}, reduced
    _project_everything(monkeypatch)
    assert sum(rows()) > sum(reduced)
