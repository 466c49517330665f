"""Exactness tests of the BD3-LM forward pass and block NELBO (the heart of the suite)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from modeling_bd3lm import BD3LMForMaskedDiffusion
from tests.conftest import random_model

ATOL = 1e-5


def _ids(batch: int, length: int, vocab: int = 63, seed: int = 0) -> torch.LongTensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _mask_some(x_0: torch.LongTensor, mask_id: int, p: float = 0.5, seed: int = 1) -> torch.LongTensor:
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(x_0.shape, generator=g) < p, torch.full_like(x_0, mask_id), x_0)


# ----------------------------------------------------------------------------------------------------------------------
# The official code's golden outputs


@pytest.fixture
def official(official_fixture_dir):
    model = BD3LMForMaskedDiffusion.from_pretrained(official_fixture_dir).eval()
    return model, load_file(official_fixture_dir / "cases.safetensors")


def test_official_state_dict_loads_exactly(official_fixture_dir):
    weights = load_file(official_fixture_dir / "model.safetensors")
    model = BD3LMForMaskedDiffusion.from_pretrained(official_fixture_dir)
    # the official key of the token table is `...vocab_embed.embedding`; in memory it is nn.Embedding's `weight`
    assert "backbone.vocab_embed.embedding" in weights
    weights["backbone.vocab_embed.weight"] = weights.pop("backbone.vocab_embed.embedding")
    ours = model.state_dict()
    assert set(ours) == set(weights)
    for key, value in weights.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    # the searched interval comes from the weights, not from config.json (0.001 / 0.999)
    assert model.training_noise_interval() == pytest.approx((0.45, 0.95))


@torch.no_grad()
def test_official_training_pass_logits(official):
    model, cases = official
    logits = model(cases["train_x0"], noisy_input_ids=cases["train_xt"], return_dict=True).logits
    torch.testing.assert_close(logits, cases["train_logits"], rtol=0, atol=ATOL)


@torch.no_grad()
@pytest.mark.parametrize("window", ["sample", "sample_short"])
def test_official_sample_mode_logits(official, window):
    model, cases = official
    logits = model(cases[f"{window}_input"], return_dict=True).logits
    torch.testing.assert_close(logits, cases[f"{window}_logits"], rtol=0, atol=ATOL)


@torch.no_grad()
def test_official_kv_cache_logits(official):
    model, cases = official
    x, bs = cases["sample_input"], model.config.block_size
    cache, stored = DynamicCache(), []
    for k in range(x.shape[1] // bs - 1):
        stored.append(model(x[:, k * bs : (k + 1) * bs], cache=cache, use_cache=True, return_dict=True).logits)
    torch.testing.assert_close(torch.cat(stored, 1), cases["kv_store_logits"], rtol=0, atol=ATOL)
    last = model(x[:, -bs:], cache=cache, use_cache=False, return_dict=True).logits
    torch.testing.assert_close(last, cases["kv_block_logits"], rtol=0, atol=ATOL)
    assert cache.get_seq_length() == x.shape[1] - bs  # the noisy block was not committed


def test_official_config_returns_tuples(official):
    model, cases = official
    assert model.config.return_dict is False  # as in the released config.json
    out = model(cases["sample_input"])
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], cases["sample_logits"], rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------------------------------------------------
# Vectorised pass == per-block loop


def per_block_logits(model, x_0: torch.LongTensor, x_t: torch.LongTensor) -> torch.Tensor:
    """Run the network once per block on `[x_0 blocks < b ; x_t block b]` and keep the last block's logits."""
    bs = model.config.block_size
    out = []
    for b in range(x_0.shape[1] // bs):
        window = torch.cat((x_0[:, : b * bs], x_t[:, b * bs : (b + 1) * bs]), dim=1)
        out.append(model(window, return_dict=True).logits[:, -bs:])
    return torch.cat(out, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("block_size", [1, 2, 4, 8, 16, 32])
def test_vectorised_logits_equal_per_block_loop(block_size):
    model = random_model(block_size=block_size)
    x_0 = _ids(3, 32)
    x_t = _mask_some(x_0, model.mask_token_id)
    vectorised = model(x_0, noisy_input_ids=x_t, return_dict=True).logits
    torch.testing.assert_close(vectorised, per_block_logits(model, x_0, x_t), rtol=0, atol=ATOL)


@torch.no_grad()
def test_vectorised_loss_equals_per_block_loop_loss():
    model = random_model(block_size=4)
    x_0 = _ids(2, 32)
    t = torch.rand(2, 8, generator=torch.Generator().manual_seed(3)) * 0.9 + 0.1
    x_t = _mask_some(x_0, model.mask_token_id)
    out = model(x_0, noisy_input_ids=x_t, labels=x_0, noise_levels=t, return_dict=True)
    loss_loop, _ = model.block_nelbo(per_block_logits(model, x_0, x_t), x_0, x_t, t)
    torch.testing.assert_close(out.loss, loss_loop, rtol=0, atol=ATOL)
    # and the loss is the explicit formula: mean over tokens of 1[masked] · (1 / t_b) · (−log p_θ(x_0))
    log_p = torch.log_softmax(out.logits.float().index_fill(-1, torch.tensor([63]), float("-inf")), -1)
    nll = -log_p.gather(-1, x_0[..., None]).squeeze(-1)
    manual = ((x_t == 63) * nll / t.repeat_interleave(4, 1)).mean()
    torch.testing.assert_close(out.loss, manual, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_block_size_one_with_t_equal_one_is_the_autoregressive_nll():
    model = random_model(block_size=1, always_mask=True)
    x_0 = _ids(2, 32)
    loss = model(x_0, labels=x_0, return_dict=True).loss
    # AR NLL of the same weights: predict x_0^i from x_0^{<i} and one mask token at position i
    nll = []
    for i in range(32):
        window = torch.cat((x_0[:, :i], torch.full((2, 1), 63)), dim=1)
        logits = model(window, return_dict=True).logits[:, -1].float()
        logits[:, 63] = float("-inf")
        nll.append(-torch.log_softmax(logits, -1).gather(-1, x_0[:, i : i + 1]))
    torch.testing.assert_close(loss, torch.cat(nll, 1).mean(), rtol=0, atol=ATOL)


@torch.no_grad()
def test_block_size_equal_to_length_is_mdlm():
    model = random_model(block_size=32)
    x_0 = _ids(2, 32)
    x_t = _mask_some(x_0, model.mask_token_id)
    t = torch.full((2, 1), 0.5)
    vectorised = model(x_0, noisy_input_ids=x_t, labels=x_0, noise_levels=t, return_dict=True)
    bidirectional = model(x_t, return_dict=True).logits  # one bidirectional pass over x_t
    torch.testing.assert_close(vectorised.logits, bidirectional, rtol=0, atol=ATOL)
    mdlm_loss, _ = model.block_nelbo(bidirectional, x_0, x_t, t)
    torch.testing.assert_close(vectorised.loss, mdlm_loss, rtol=0, atol=ATOL)


@torch.no_grad()
def test_perturbing_clean_block_k_changes_only_later_noisy_blocks():
    model = random_model(block_size=4)
    x_0 = _ids(2, 32)
    x_t = _mask_some(x_0, model.mask_token_id)
    base = model(x_0, noisy_input_ids=x_t, return_dict=True).logits
    for k in range(8):
        x_0_pert = x_0.clone()
        x_0_pert[:, 4 * k : 4 * k + 4] = (x_0_pert[:, 4 * k : 4 * k + 4] + 7) % 63
        diff = (model(x_0_pert, noisy_input_ids=x_t, return_dict=True).logits - base).abs()
        per_block = diff.view(2, 8, 4, -1).amax(dim=(0, 2, 3))
        assert torch.all(per_block[: k + 1] == 0), (k, per_block)
        assert torch.all(per_block[k + 1 :] > 1e-4), (k, per_block)


# ----------------------------------------------------------------------------------------------------------------------
# Attention kernels and padding


@torch.no_grad()
@pytest.mark.parametrize("impl", ["eager", "flex_attention"])
def test_attention_implementations_agree_with_sdpa(impl):
    sdpa = random_model(block_size=4)
    other = random_model(block_size=4, attn_implementation=impl)
    x_0 = _ids(2, 32)
    x_t = _mask_some(x_0, 63)
    for kwargs in ({"noisy_input_ids": x_t}, {}):
        a = sdpa(x_0, return_dict=True, **kwargs).logits
        b = other(x_0, return_dict=True, **kwargs).logits
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    padding = torch.ones(2, 32, dtype=torch.long)
    padding[0, :5] = 0
    a = sdpa(x_0, noisy_input_ids=x_t, attention_mask=padding, return_dict=True).logits
    b = other(x_0, noisy_input_ids=x_t, attention_mask=padding, return_dict=True).logits
    torch.testing.assert_close(a[:, 5:], b[:, 5:], rtol=0, atol=ATOL)


@torch.no_grad()
def test_padding_is_never_attended_and_never_in_the_loss():
    model = random_model(block_size=4)
    x_0 = _ids(1, 32)
    x_t = _mask_some(x_0, 63)
    t = torch.full((1, 8), 0.5)
    mask = torch.ones(1, 32, dtype=torch.long)
    mask[:, 24:] = 0  # right padding: the last two blocks are padding
    out = model(x_0, noisy_input_ids=x_t, labels=x_0, noise_levels=t, attention_mask=mask, return_dict=True)
    # changing what sits in the padded positions changes nothing
    x_0_b, x_t_b = x_0.clone(), x_t.clone()
    x_0_b[:, 24:] = 5
    x_t_b[:, 24:] = 63
    out_b = model(x_0_b, noisy_input_ids=x_t_b, labels=x_0_b, noise_levels=t, attention_mask=mask, return_dict=True)
    torch.testing.assert_close(out.logits[:, :24], out_b.logits[:, :24], rtol=0, atol=ATOL)
    torch.testing.assert_close(out.loss, out_b.loss, rtol=0, atol=ATOL)
    assert torch.all(out.token_loss[:, 24:] == 0)
    # and the loss equals the unpadded 24-token sequence's loss
    short = model(x_0[:, :24], noisy_input_ids=x_t[:, :24], labels=x_0[:, :24], noise_levels=t[:, :6], return_dict=True)
    torch.testing.assert_close(out.loss, short.loss, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------------------------------------------------
# The noise the model draws itself


def test_training_mode_draws_from_the_clipped_interval_and_eval_mode_from_the_unbiased_one():
    model = random_model(block_size=4)
    model.set_noise_interval(0.45, 0.95)
    x_0 = _ids(8, 32)
    model.train()
    out = model(x_0, labels=x_0, generator=torch.Generator().manual_seed(0), return_dict=True)
    assert out.noise_levels.shape == (8, 8)
    assert out.noise_levels.min() >= 0.45 and out.noise_levels.max() <= 0.95
    model.eval()
    out = model(x_0, labels=x_0, generator=torch.Generator().manual_seed(0), return_dict=True)
    assert out.noise_levels.min() >= 1e-3 and out.noise_levels.max() <= 1.0
    assert out.noise_levels.min() < 0.45 and out.noise_levels.max() > 0.95  # 64 stratified draws cover [1e-3, 1]
    # antithetic: exactly one draw per stratum of width 1/64
    strata = ((out.noise_levels.flatten() - 1e-3) / (1 - 1e-3) * 64).floor()
    assert sorted(strata.tolist()) == list(range(64))


def test_resampling_keeps_every_block_in_the_interval():
    model = random_model(block_size=4, resample=True)
    model.set_noise_interval(0.45, 0.95)
    model.train()
    x_0 = _ids(16, 32)
    out = model(x_0, labels=x_0, generator=torch.Generator().manual_seed(1), return_dict=True)
    fractions = (out.noisy_input_ids == 63).view(16, 8, 4).float().mean(-1)
    assert torch.all((fractions >= 0.45) & (fractions <= 0.95))  # only 2 or 3 masked tokens per block


@pytest.mark.parametrize(
    ("interval", "enforced"), [((1e-3, 1.0), None), ((1e-3, 0.8), (0.0, 0.8)), ((0.3, 1.0), (0.3, 1.0))]
)
def test_resampling_leaves_the_default_ends_unenforced(monkeypatch, interval, enforced):
    """1e-3 read back from the float32 buffers is 0.0010000000475; it must still count as the unclipped floor (else
    every block would need a masked token even at t ~ 1e-3, and the rejection loop would run out of rounds)."""
    import modeling_bd3lm.noise_schedule_bd3lm as noising

    seen = []
    real_add_noise = noising.add_noise

    def spy(x_0, probability, mask_id, block_size, resample_interval, *args):
        seen.append(resample_interval)
        return real_add_noise(x_0, probability, mask_id, block_size, resample_interval, *args)

    monkeypatch.setattr(noising, "add_noise", spy)
    model = random_model(block_size=4, resample=True)
    model.set_noise_interval(*interval)
    model.train()
    x_0 = _ids(2, 32)
    model(x_0, labels=x_0, generator=torch.Generator().manual_seed(0), return_dict=True)
    if enforced is None:
        assert seen == [None]
    else:
        torch.testing.assert_close(torch.tensor(seen[0]), torch.tensor(enforced))


def test_ignore_bos_keeps_position_zero_and_drops_it_from_the_mean():
    model = random_model(block_size=4, ignore_bos=True, always_mask=True)
    x_0 = _ids(2, 32)
    out = model(x_0, labels=x_0, return_dict=True)
    assert torch.all(out.noisy_input_ids[:, 0] == x_0[:, 0])
    assert torch.all(out.noisy_input_ids[:, 1:] == 63)
    torch.testing.assert_close(out.loss, out.token_loss[:, 1:].mean(), rtol=1e-6, atol=1e-6)


def test_same_generator_gives_the_same_loss():
    model = random_model(block_size=4)
    x_0 = _ids(2, 32)
    a = model(x_0, labels=x_0, generator=torch.Generator().manual_seed(5), return_dict=True).loss
    b = model(x_0, labels=x_0, generator=torch.Generator().manual_seed(5), return_dict=True).loss
    assert torch.equal(a, b)


def test_loss_backpropagates_to_every_parameter():
    model = random_model(block_size=4)
    model.train()
    x_0 = _ids(2, 32)
    model(x_0, labels=x_0, return_dict=True).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@torch.no_grad()
def test_hidden_states_and_return_dict():
    model = random_model(block_size=4)
    x_0 = _ids(2, 32)
    out = model(x_0, noisy_input_ids=x_0, output_hidden_states=True, return_dict=True)
    assert len(out.hidden_states) == model.config.n_blocks + 1
    assert all(h.shape == (2, 32, 64) for h in out.hidden_states)
    as_tuple = model(x_0, noisy_input_ids=x_0, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.logits)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"input_ids": torch.zeros(1, 40, dtype=torch.long), "labels": torch.zeros(1, 40, dtype=torch.long)},
            "model_length",
        ),
        (
            {"input_ids": torch.zeros(1, 30, dtype=torch.long), "labels": torch.zeros(1, 30, dtype=torch.long)},
            "multiple of `block_size`",
        ),
        (
            {
                "input_ids": torch.zeros(1, 32, dtype=torch.long),
                "noisy_input_ids": torch.zeros(1, 28, dtype=torch.long),
            },
            "noisy_input_ids",
        ),
        ({"input_ids": torch.zeros(1, 32, dtype=torch.long), "noise_levels": torch.full((1, 8), 1.5)}, r"\[0, 1\]"),
        ({"input_ids": torch.zeros(1, 32, dtype=torch.long), "noise_levels": torch.full((1, 7), 0.5)}, "noise_levels"),
        ({"input_ids": torch.full((1, 32), 64, dtype=torch.long)}, "outside"),
        ({"input_ids": torch.zeros(1, 33, dtype=torch.long)}, "model_length"),
        (
            {
                "input_ids": torch.zeros(1, 32, dtype=torch.long),
                "noisy_input_ids": torch.zeros(1, 32, dtype=torch.long),
                "labels": torch.zeros(1, 32, dtype=torch.long),
            },
            "noise_levels",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, match):
    model = random_model()
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_float_input_ids_raise_type_error():
    with pytest.raises(TypeError, match="input_ids"):
        random_model()(torch.zeros(1, 32))


def test_unknown_attn_implementation_raises():
    with pytest.raises(ValueError, match="attn_implementation|attn_backend"):
        random_model(attn_implementation="nope")(torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_ids_give_the_logits_and_loss_of_int64(dtype):
    # uint8 ids must not be taken for a boolean mask by the embedding lookup
    model = random_model()
    x_0 = torch.randint(0, 63, (2, 32), generator=torch.Generator().manual_seed(0))
    x_t = torch.where(torch.rand(2, 32, generator=torch.Generator().manual_seed(1)) < 0.5, 63, x_0)
    t = torch.full((2, 8), 0.5)
    expected = model(x_0, noisy_input_ids=x_t, labels=x_0, noise_levels=t, return_dict=True)
    narrow = model(x_0.to(dtype), noisy_input_ids=x_t.to(dtype), labels=x_0.to(dtype), noise_levels=t, return_dict=True)
    torch.testing.assert_close(narrow.logits, expected.logits)
    torch.testing.assert_close(narrow.loss, expected.loss)
    torch.testing.assert_close(model(x_t.to(dtype), return_dict=True).logits, model(x_t, return_dict=True).logits)
