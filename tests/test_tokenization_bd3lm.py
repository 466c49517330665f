"""`modeling_bd3lm.tokenization_bd3lm`, the one owner of tokenizer -> model ids: the mask token, the special ids with
their one pad rule, and loading. The callers (conversion, the corpus, presets, the CLI, the Trainer) agree because they
call it; the last tests check that nobody else writes these rules again."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from modeling_bd3lm import BD3LMConfig
from modeling_bd3lm.tokenization_bd3lm import (
    MASK_TOKEN,
    add_mask_token,
    add_pad_token,
    load_pretrained_tokenizer,
    set_special_token_ids,
    special_token_ids,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 40


def _tokenizer(size: int = VOCAB, pad: bool = False):
    """A word-level fast tokenizer "w0".. (w1 = BOS = EOS as GPT-2's, w0 = PAD only with `pad=True`), no mask."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"pad_token": "w0"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="w1", eos_token="w1", unk_token="w2", **extra)


def _causal_lm(vocab: int = VOCAB, tie: bool = False, pad_token_id: int | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------------------------------------------------
# The mask token


def test_a_tokenizer_without_mask_gets_it_at_the_next_id() -> None:
    tokenizer = _tokenizer()
    assert add_mask_token(tokenizer) == VOCAB == tokenizer.mask_token_id and tokenizer.mask_token == MASK_TOKEN
    assert add_mask_token(tokenizer) == VOCAB and len(tokenizer) == VOCAB + 1  # a second call changes nothing


@pytest.mark.parametrize("tie", [False, True])
def test_with_a_model_the_new_row_is_the_mean_of_the_old_rows(tie: bool) -> None:
    model, tokenizer = _causal_lm(tie=tie), _tokenizer()
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    assert add_mask_token(tokenizer, model) == VOCAB
    new_input = model.get_input_embeddings().weight
    assert new_input.shape[0] == VOCAB + 1 and torch.equal(new_input[:VOCAB], old_input)
    torch.testing.assert_close(new_input[VOCAB], old_input.mean(dim=0))
    if not tie:
        torch.testing.assert_close(model.get_output_embeddings().weight[VOCAB], old_head.mean(dim=0))


def test_an_id_that_already_has_a_row_keeps_it() -> None:
    model, tokenizer = _causal_lm(vocab=VOCAB + 8), _tokenizer()  # a vocabulary padded past the tokenizer, as Qwen's
    before = model.get_input_embeddings().weight.detach().clone()
    assert add_mask_token(tokenizer, model) == VOCAB
    assert torch.equal(model.get_input_embeddings().weight, before)


def test_without_a_tokenizer_the_mask_is_a_new_last_row() -> None:
    model = _causal_lm()
    assert add_mask_token(None, model) == VOCAB and model.get_input_embeddings().weight.shape[0] == VOCAB + 1


@pytest.mark.parametrize(
    "case, match",
    [
        ("ordinary", "mask_token='w5' is already an ordinary token"),
        ("too large", "not this model's tokenizer"),
        ("neither", "needs a tokenizer, a model or both"),
    ],
)
def test_bad_input_is_refused_with_the_fix(case: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        if case == "ordinary":
            add_mask_token(_tokenizer(), mask_token="w5")
        elif case == "too large":
            add_mask_token(_tokenizer(size=VOCAB + 1), _causal_lm())
        else:
            add_mask_token(None)


# ----------------------------------------------------------------------------------------------------------------------
# The special ids and their one pad rule


def test_the_pad_rule_is_the_tokenizers_pad_else_the_configs_else_eos() -> None:
    assert special_token_ids(_tokenizer(pad=True))["pad_token_id"] == 0
    assert special_token_ids(_tokenizer(), BD3LMConfig(pad_token_id=7))["pad_token_id"] == 7
    ids = special_token_ids(_tokenizer())
    assert ids == {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 1, "mask_token_id": None}
    # no tokenizer: the config's own ids, the same pad rule
    config = BD3LMConfig(vocab_size=VOCAB + 1, bos_token_id=3, eos_token_id=4, pad_token_id=None)
    assert special_token_ids(None, config) == {
        "bos_token_id": 3,
        "eos_token_id": 4,
        "pad_token_id": 4,
        "mask_token_id": VOCAB,
    }


def test_set_special_token_ids_writes_what_is_known_onto_both_configs() -> None:
    config, generation = BD3LMConfig(bos_token_id=5, vocab_size=VOCAB + 1), GenerationConfig()
    set_special_token_ids(
        config, {"bos_token_id": None, "eos_token_id": 1, "pad_token_id": 0, "mask_token_id": VOCAB}, generation
    )
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id, config.mask_token_id) == (5, 1, 0, VOCAB)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (None, 1, 0)
    assert getattr(generation, "mask_token_id", None) is None  # the generation config reads the model's
    with pytest.raises(ValueError, match="unknown keys \\['unk_token_id'\\]"):
        set_special_token_ids(config, {"unk_token_id": 2})


def test_add_pad_token_pads_with_eos_only_when_there_is_no_pad() -> None:
    assert add_pad_token(_tokenizer()).pad_token_id == 1
    assert add_pad_token(_tokenizer(pad=True)).pad_token_id == 0


def test_load_pretrained_tokenizer_reads_a_folder(tmp_path: Path) -> None:
    _tokenizer().save_pretrained(tmp_path)
    assert load_pretrained_tokenizer(tmp_path).convert_tokens_to_ids("w7") == 7


# ----------------------------------------------------------------------------------------------------------------------
# The callers agree (they call the owner)


def test_every_caller_gives_a_tokenizer_without_pad_the_same_ids() -> None:
    """Conversion, presets, the Trainer's collator and the corpus name: one tokenizer without PAD, one set of ids."""
    from bd3lm_configuration import load_preset
    from bd3lm_trainer import corpus
    from bd3lm_trainer.trainer import _pad_token_id
    from modeling_bd3lm import BD3LMForMaskedDiffusion

    tokenizer = _tokenizer()
    converted = BD3LMForMaskedDiffusion.from_causal_lm(_causal_lm(), block_size=4, tokenizer=tokenizer, model_length=16)
    preset = load_preset("tiny", tokenizer=tokenizer)
    expected = (1, 1, 1, VOCAB)  # BOS, EOS, PAD = EOS, mask at the next id
    for config in (converted.config, preset):
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id, config.mask_token_id) == expected
    assert converted.generation_config.pad_token_id == 1
    assert _pad_token_id(tokenizer, preset) == 1
    assert _pad_token_id(None, BD3LMConfig(vocab_size=VOCAB + 1, eos_token_id=4, pad_token_id=None)) == 4
    assert corpus.MASK_TOKEN is MASK_TOKEN and corpus.add_mask_token(_tokenizer()).pad_token_id == 1


def _python_files() -> list[Path]:
    return [p for folder in ("modeling_bd3lm", "trainer", "configuration") for p in (ROOT / folder).rglob("*.py")]


def test_only_the_owner_spells_the_mask_token_or_sets_a_pad_token() -> None:
    """In the installed packages the literal `"<|mask|>"` and assignments to `.pad_token`(`_id`) appear in
    `tokenization_bd3lm.py` only."""
    owner = ROOT / "modeling_bd3lm" / "tokenization_bd3lm.py"
    found = []
    for path in _python_files():
        if path == owner:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value == MASK_TOKEN:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {MASK_TOKEN!r}")
            targets = node.targets if isinstance(node, ast.Assign) else []
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno} .pad_token ="
                for t in targets
                if isinstance(t, ast.Attribute) and t.attr in ("pad_token", "pad_token_id")
            ]
    assert found == []
