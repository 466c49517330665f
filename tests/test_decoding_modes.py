"""The decoding modes of `generate()` (`generation_mode`): "autoregressive" and "draft_verify" decode through the clean
stream of a converted causal LM, which a fresh conversion leaves untouched, so their greedy output is the source
model's `generate(do_sample=False)` token for token (fp32): batch 1 and a left-padded batch, beyond `model_length`,
with EOS, stop strings, a streamer and logits processors. Poor drafts change only the speed; a wrong verifier (an
adapter left on in the clean stream, or acceptance without checking) makes the equality fail. Sampling draws every
token from a stream keyed by (seed, row, position), so draft-and-verify sampling is autoregressive sampling, token for
token. The tiny models are those of tests/test_causal_backbone.py (model_length=16)."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor
from transformers.generation.streamers import BaseStreamer

from modeling_bd3lm import DECODING_MODES, BD3LMGenerationConfig
from tests.test_causal_backbone import FAMILIES, LENGTH, VOCAB, _convert, _tokens

CLEAN_MODES = [
    ("autoregressive", {}),
    ("draft_verify", {"draft_variant": "two_pass"}),
    ("draft_verify", {"draft_variant": "one_forward"}),
]
MODE_IDS = ["autoregressive", "two_pass", "one_forward"]


def _padded_prompts() -> tuple[torch.LongTensor, torch.LongTensor]:
    prompts = _tokens(3, 6, seed=5)
    attention = torch.ones_like(prompts)
    prompts[1, :2], attention[1, :2] = 0, 0  # left padding
    prompts[2, :4], attention[2, :4] = 0, 0
    return prompts, attention


def _char_tokenizer():
    """One printable character per token id 0..89 (decoded by concatenation), the mask token as id 90: stop strings
    need a tokenizer whose tokens decode to text."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = (string.ascii_letters + string.digits + string.punctuation)[:VOCAB]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)} | {"<mask>": VOCAB}, unk_token=chars[3]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=chars[0],
        bos_token=chars[1],
        eos_token=chars[2],
        unk_token=chars[3],
        mask_token="<mask>",
    )


class Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.tokens.extend(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


# ----------------------------------------------------------------------------------------------------------------------
# Greedy: the source model's generate()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("mode", "extra"), CLEAN_MODES, ids=MODE_IDS)
def test_greedy_equals_the_source_generate_alone_batched_and_beyond_model_length(family, mode, extra):
    reference, model = _convert(family, 4)
    prompts, attention = _padded_prompts()
    new = 30  # 6 + 30 > model_length = 16: the clean stream has no window
    for ids, mask in ((prompts[:1], attention[:1]), (prompts, attention)):
        expected = reference.generate(
            ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        got = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            generation_mode=mode,
            **extra,
        )
        assert got.shape[1] == 6 + new > LENGTH
        assert torch.equal(got, expected), (got, expected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize(("mode", "extra"), CLEAN_MODES, ids=MODE_IDS)
def test_greedy_with_eos_processors_and_streamer_equals_the_source(family, mode, extra):
    reference, model = _convert(family, 4)
    prompts, attention = _padded_prompts()
    free = reference.generate(
        prompts, attention_mask=attention, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    suppress = int(free[0, 6 + 2])

    def processors():
        return LogitsProcessorList([SuppressTokensLogitsProcessor([suppress])])

    common = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, repetition_penalty=1.3)
    free = reference.generate(
        prompts, attention_mask=attention, logits_processor=processors(), eos_token_id=None, **common
    )
    common["eos_token_id"] = int(free[1, 6 + 7])  # a token row 1 produces: rows then stop at different lengths
    eos = common["eos_token_id"]

    expected = reference.generate(prompts, attention_mask=attention, logits_processor=processors(), **common)
    got = model.generate(
        prompts, attention_mask=attention, logits_processor=processors(), generation_mode=mode, **extra, **common
    )
    assert torch.equal(got, expected), (got, expected)
    assert bool((got == eos).any()) and not bool((got[:, 6:] == suppress).any())
    # the streamer (batch 1): the prompt then every new token, then end(); as the source's
    theirs, ours = Recorder(), Recorder()
    expected = reference.generate(prompts[:1], streamer=theirs, logits_processor=processors(), **common)
    got = model.generate(
        prompts[:1], streamer=ours, logits_processor=processors(), generation_mode=mode, **extra, **common
    )
    assert torch.equal(got, expected) and ours.tokens == theirs.tokens == got[0].tolist() and ours.ended


@pytest.mark.parametrize(("mode", "extra"), CLEAN_MODES, ids=MODE_IDS)
def test_greedy_with_stop_strings_equals_the_source(mode, extra):
    reference, model = _convert("qwen3", 4)
    tokenizer = _char_tokenizer()
    prompts, attention = _padded_prompts()
    free = reference.generate(
        prompts, attention_mask=attention, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    stop = tokenizer.decode(free[2, 6 + 4 : 6 + 6])  # two characters row 2 generates
    # with an EOS id transformers pads a row that stopped (without one it lets the row run on): EOS 2 as the model's
    common = dict(
        max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0, stop_strings=[stop], tokenizer=tokenizer
    )
    expected = reference.generate(prompts, attention_mask=attention, **common)
    got = model.generate(prompts, attention_mask=attention, generation_mode=mode, **extra, **common)
    assert torch.equal(got, expected) and bool((got[2, 12:] == 0).all())  # row 2 stopped at the string


@pytest.mark.parametrize("variant", ["two_pass", "one_forward"])
def test_poor_drafts_change_the_speed_not_the_output(variant, monkeypatch):
    """Drafts replaced by random tokens: the same text, fewer tokens accepted per verify call."""
    import modeling_bd3lm.draft_verify_bd3lm as dv

    reference, model = _convert("llama", 4)
    prompts, attention = _padded_prompts()
    kwargs = dict(
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=None,
        generation_mode="draft_verify",
        draft_variant=variant,
        return_dict_in_generate=True,
    )
    good = model.generate(prompts, attention_mask=attention, **kwargs)
    noise = torch.Generator().manual_seed(0)
    monkeypatch.setattr(dv, "suppress_mask_logit", lambda logits, _: torch.randn(logits.shape, generator=noise))
    poor = model.generate(prompts, attention_mask=attention, **kwargs)
    expected = reference.generate(
        prompts, attention_mask=attention, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert torch.equal(poor.sequences, expected) and torch.equal(good.sequences, expected)
    mean = lambda out: torch.cat(out.acceptance_lengths).double().mean()  # noqa: E731
    assert mean(poor) < mean(good)


def test_a_wrong_verifier_breaks_the_equality(monkeypatch):
    """The equality test can fail: (a) a clean stream changed by an ungated LoRA (nonzero B), (b) a verifier that
    accepts every draft without checking it."""
    from peft import LoraConfig, get_peft_model

    import modeling_bd3lm.draft_verify_bd3lm as dv

    reference, model = _convert("llama", 4)
    prompts, attention = _padded_prompts()
    expected = reference.generate(
        prompts, attention_mask=attention, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    kwargs = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, generation_mode="draft_verify")
    assert torch.equal(model.generate(prompts, attention_mask=attention, **kwargs), expected)

    original = dv.DraftVerifyMode._accept

    def accept_everything(state, chooser, logits, drafts):
        tokens, _ = original(state, chooser, logits, drafts)
        tokens[:, : drafts.shape[1]] = drafts
        return tokens, torch.full_like(tokens[:, 0], drafts.shape[1])

    monkeypatch.setattr(dv.DraftVerifyMode, "_accept", staticmethod(accept_everything))
    assert not torch.equal(model.generate(prompts, attention_mask=attention, **kwargs), expected)
    monkeypatch.undo()

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model.backbone = get_peft_model(model.backbone, lora).base_model.model  # LoRA layers in place, B != 0
    assert not torch.equal(model.generate(prompts, attention_mask=attention, **kwargs), expected)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling: keyed per (seed, row, position)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_draft_verify_sampling_is_autoregressive_sampling_with_the_same_seed(family):
    _, model = _convert(family, 4)
    prompts, attention = _padded_prompts()
    common = dict(max_new_tokens=24, do_sample=True, temperature=1.3, top_k=40, eos_token_id=None, seed=[3, 4, 5])
    ar = model.generate(prompts, attention_mask=attention, generation_mode="autoregressive", **common)
    for variant in ("two_pass", "one_forward"):
        dv = model.generate(
            prompts,
            attention_mask=attention,
            generation_mode="draft_verify",
            draft_variant=variant,
            return_dict_in_generate=True,
            **common,
        )
        assert torch.equal(dv.sequences, ar), variant
        assert int(torch.cat(dv.acceptance_lengths).max()) > 1  # drafts were accepted: fewer calls, same tokens
    # a row's draws depend on its own seed and positions only: alone it samples what it samples in the batch
    alone = model.generate(prompts[2:, 4:], generation_mode="autoregressive", **{**common, "seed": 5})
    assert torch.equal(alone[0, 2:], ar[2, 6:])
    other = model.generate(
        prompts, attention_mask=attention, generation_mode="autoregressive", **{**common, "seed": [6, 7, 8]}
    )
    assert not torch.equal(other, ar)


def test_autoregressive_sampling_follows_the_source_distribution():
    """Position 0's empirical token frequencies over 400 seeds against the source's softmax (a loose check of the
    inverse-CDF draw; the exact test is the equality above)."""
    reference, model = _convert("llama", 4)
    prompt = _tokens(1, 5, seed=9)
    with torch.no_grad():
        probs = (reference(prompt).logits[0, -1] / 0.5).softmax(-1).double()
    draws = 400
    firsts = torch.tensor(
        [
            int(
                model.generate(
                    prompt,
                    max_new_tokens=1,
                    do_sample=True,
                    top_k=0,
                    temperature=0.5,
                    seed=s,
                    generation_mode="autoregressive",
                )[0, -1]
            )
            for s in range(draws)
        ]
    )
    distance = float((torch.bincount(firsts, minlength=VOCAB) / draws - probs).abs().sum())
    # the same distance for exact multinomial draws (its spread), and for draws from a wrong distribution
    simulated = torch.stack(
        [
            (
                torch.bincount(
                    torch.multinomial(probs, draws, replacement=True, generator=torch.Generator().manual_seed(s)),
                    minlength=VOCAB,
                )
                / draws
                - probs
            )
            .abs()
            .sum()
            for s in range(50)
        ]
    )
    assert distance < float(simulated.max()) * 1.2, (distance, simulated.max())
    flat = torch.full_like(probs, 1 / VOCAB)
    assert float((flat - probs).abs().sum()) > 2 * float(simulated.max())  # the check can tell a wrong distribution


# ----------------------------------------------------------------------------------------------------------------------
# Outputs, refusals, configuration, entry points


def test_outputs_report_calls_tokens_per_forward_and_acceptance():
    _, model = _convert("llama", 4)
    prompt = _tokens(1, 6, seed=5)
    kwargs = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    ar = model.generate(prompt, generation_mode="autoregressive", **kwargs)
    assert ar.nfe.tolist() == [20] and ar.num_forwards == 20 and ar.acceptance_lengths is None
    assert ar.generation_mode == "autoregressive" and ar.tokens_per_forward.tolist() == [1.0]
    two = model.generate(prompt, generation_mode="draft_verify", **kwargs)
    cycles = len(two.acceptance_lengths[0])
    assert two.generation_mode == "draft_verify" and int(two.nfe[0]) == 1 + 2 * cycles == two.num_forwards
    assert int(two.acceptance_lengths[0].sum()) >= 20 - 1  # the prefill's token, then each cycle's (the last cut)
    assert two.tokens_per_forward.tolist() == [20 / int(two.nfe[0])]
    one = model.generate(prompt, generation_mode="draft_verify", draft_variant="one_forward", **kwargs)
    assert int(one.nfe[0]) == 1 + len(one.acceptance_lengths[0])
    assert bool((one.acceptance_lengths[0] >= 1).all()) and bool((one.acceptance_lengths[0] <= 4).all())
    assert model.generate(prompt, max_new_tokens=5, return_dict_in_generate=True).generation_mode == "diffusion"


def test_the_clean_stream_modes_are_refused_without_an_autoregressive_view():
    from tests.test_generation_bd3lm import make_model

    dit = make_model()
    for mode in ("autoregressive", "draft_verify"):
        with pytest.raises(ValueError, match=rf"generation_mode='{mode}' decodes through the clean stream.*'dit'"):
            dit.generate(torch.tensor([[5, 6]]), max_new_tokens=4, generation_mode=mode)
    with pytest.raises(ValueError, match="has no autoregressive view"):
        dit.causal_forward(torch.tensor([[5, 6]]))
    _, unshifted = _convert("llama", 4, token_shift=False)
    with pytest.raises(ValueError, match="token_shift=False"):
        unshifted.generate(torch.tensor([[5, 6]]), max_new_tokens=4, generation_mode="draft_verify")


def test_bad_mode_settings_get_clear_errors():
    _, model = _convert("llama", 4)
    prompt = _tokens(2, 4)
    with pytest.raises(ValueError, match=r"`generation_mode` must be one of \['autoregressive', 'diffusion', "):
        BD3LMGenerationConfig(generation_mode="beam")
    with pytest.raises(ValueError, match="`draft_variant` only applies to generation_mode='draft_verify'"):
        BD3LMGenerationConfig(draft_variant="one_forward")
    with pytest.raises(ValueError, match=r"`draft_variant` must be one of \['two_pass', 'one_forward'\]"):
        BD3LMGenerationConfig(generation_mode="draft_verify", draft_variant="fused")
    with pytest.raises(ValueError, match="always runs with the KV cache"):
        model.generate(prompt, max_new_tokens=4, generation_mode="autoregressive", use_cache=False)
    with pytest.raises(ValueError, match="A streamer needs a single sequence"):
        model.generate(prompt, max_new_tokens=4, generation_mode="draft_verify", streamer=Recorder())
    with pytest.raises(ValueError, match="exceeds the source model's max_position_embeddings=64"):
        model.generate(prompt, max_new_tokens=61, generation_mode="autoregressive")
    model.generate(prompt, max_new_tokens=60, generation_mode="autoregressive", eos_token_id=None)  # 4 + 60 = 64 fits
    with pytest.raises(ValueError, match="plus 8 draft positions exceeds"):
        model.generate(prompt, max_new_tokens=53, generation_mode="draft_verify")
    model.generate(prompt, max_new_tokens=60, generation_mode="diffusion", eos_token_id=None)  # the window slides


def test_generation_mode_round_trips_and_the_cli_knows_every_mode(tmp_path):
    from bd3lm_trainer.cli.common import DRAFT_VARIANT_NAMES, GENERATION_MODE_NAMES
    from modeling_bd3lm.draft_verify_bd3lm import DRAFT_VARIANTS

    assert set(GENERATION_MODE_NAMES) == set(DECODING_MODES) and DRAFT_VARIANT_NAMES == DRAFT_VARIANTS
    config = BD3LMGenerationConfig(generation_mode="draft_verify", draft_variant="one_forward")
    config.save_pretrained(tmp_path)
    loaded = BD3LMGenerationConfig.from_pretrained(tmp_path)
    assert (loaded.generation_mode, loaded.draft_variant) == ("draft_verify", "one_forward")
    assert BD3LMGenerationConfig().generation_mode == "diffusion"


def test_causal_forward_is_the_source_forward_with_a_cache_and_padding():
    reference, model = _convert("qwen2", 4)
    ids, mask = _padded_prompts()
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
    first = model.causal_forward(ids[:, :4], attention_mask=mask[:, :4])
    from modeling_bd3lm import CACHE_FIELD

    second = model.causal_forward(ids[:, 4:], attention_mask=mask, cache=getattr(first, CACHE_FIELD))
    got = torch.cat((first.logits, second.logits), dim=1)[..., :VOCAB]
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=1e-5)


def test_pipeline_and_cli_use_the_mode(tmp_path, capsys):
    from transformers import pipeline

    from bd3lm_trainer.cli import main

    reference, model = _convert("llama", 4)
    tokenizer = _char_tokenizer()
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = "hEl1o"
    out = pipe(text, max_new_tokens=10, do_sample=False, generation_mode="draft_verify", return_full_text=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    expected = reference.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[0]["generated_text"] == tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)

    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = [
        "generate",
        str(tmp_path / "model"),
        "--prompt",
        text,
        "--max-new-tokens",
        "6",
        "--greedy",
        "--generation-mode",
        "draft_verify",
        "--draft-variant",
        "one_forward",
        "--no-stream",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tokens accepted per verify call" in printed
    assert main(["generate", str(tmp_path / "model"), "--draft-variant", "two_pass"]) == 2


# ----------------------------------------------------------------------------------------------------------------------
# The gated adapter (clean_attention="causal"): drafts change, the text stays the source's


@pytest.mark.parametrize("variant", ["two_pass", "one_forward"])
def test_a_gated_adapter_drafts_while_the_text_stays_the_source(variant):
    """A gated LoRA with nonzero B changes the drafts (the diffusion view) but never the verifier: greedy draft-and-verify
    is still the source's generate(); the same LoRA ungated (a plain LoraConfig) changes the text."""
    from peft import LoraConfig, get_peft_model

    from bd3lm_trainer import gated_lora_config

    reference, model = _convert("llama", 4, clean_attention="causal")
    prompts, attention = _padded_prompts()
    expected = reference.generate(
        prompts, attention_mask=attention, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    kwargs = dict(
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=None,
        generation_mode="draft_verify",
        draft_variant=variant,
        return_dict_in_generate=True,
    )
    plain = model.generate(prompts, attention_mask=attention, **kwargs)

    torch.manual_seed(0)
    gated = get_peft_model(model, gated_lora_config(model, preset="attention", r=4, init_lora_weights=False))
    out = gated.base_model.model.generate(prompts, attention_mask=attention, **kwargs)
    assert torch.equal(out.sequences, expected)
    as_lists = [[t.tolist() for t in o.acceptance_lengths] for o in (out, plain)]
    assert as_lists[0] != as_lists[1]  # the adapter really acted on the drafts

    _, model = _convert("llama", 4, clean_attention="causal")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ungated = get_peft_model(model, lora)
    assert not torch.equal(
        ungated.base_model.model.generate(prompts, attention_mask=attention, **kwargs).sequences, expected
    )
