"""`pipeline("text-generation", model=<saved folder>, trust_remote_code=True)` works as the model card's
`pipeline_tag` promises: in a fresh process without this project, offline, on the transformers 5.x we install and on
4.57, with a batch of prompts, `max_new_tokens`, sampling and sampler arguments, `return_full_text`,
`num_return_sequences` and a streamer. Every text is checked against `model.generate` run here."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_python_without_project
from tests.test_generation_bd3lm import EOS, make_model, make_toy_tokenizer
from tests.test_remote_code import _interpreters

PROMPTS = ["abc", "helloWor", "xy"]  # the toy tokenizer has no space

# Runs in the child (FOLDER is replaced): every pipeline call, its result written as JSON.
CHILD = r"""
import json, sys
import transformers
from transformers import pipeline
from transformers.generation.streamers import BaseStreamer

class Recorder(BaseStreamer):
    def __init__(self):
        self.values = []
    def put(self, value):
        self.values.append(value.tolist())
    def end(self):
        self.values.append("end")

pipe = pipeline("text-generation", model=FOLDER, trust_remote_code=True)
assert type(pipe.model).__name__ == "BD3LMForMaskedDiffusion", type(pipe.model)
prompts = PROMPTS
out = {"version": transformers.__version__}
out["greedy"] = pipe(prompts, max_new_tokens=10, do_sample=False, batch_size=3)
out["greedy_one_by_one"] = pipe(prompts, max_new_tokens=10, do_sample=False)
# the pipeline's own defaults (do_sample=True, temperature=0.7) with a seed, new text only
out["sampled"] = pipe(prompts, max_new_tokens=10, seed=4, batch_size=2, return_full_text=False)
out["threshold"] = pipe(prompts, max_new_tokens=10, do_sample=False, confidence_threshold=0.3, batch_size=3)
out["topk"] = pipe(prompts[0], max_new_tokens=10, do_sample=True, temperature=1.2, top_k=8, seed=2,
                   sampler="topk_confidence", tokens_per_step=2)
out["repeats"] = pipe(prompts[1], max_new_tokens=8, do_sample=True, seed=3, num_return_sequences=2)
recorder = Recorder()
out["streamed"] = pipe(prompts[1], max_new_tokens=10, do_sample=False, streamer=recorder)
out["stream"] = recorder.values
with open(FOLDER + "/pipeline_out.json", "w") as f:
    json.dump(out, f)
"""


def _save_folder(path) -> tuple:
    model = make_model(eos_token_id=EOS)
    tokenizer = make_toy_tokenizer()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # transformers 5 records its internal tokenizer class, which 4.57 cannot resolve; the project's own tokenizer is
    # saved the same way (trainer/corpus/build_corpus.py).
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config))
    return model, tokenizer


def _new_text(model, tokenizer, prompt: str, **kwargs) -> list[str]:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, **kwargs)
    return [tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]


@pytest.mark.parametrize("python", _interpreters())
def test_text_generation_pipeline_from_a_saved_folder(python, tmp_path):
    if python is None:
        pytest.fail("BD3LM_REQUIRE_TF4=1 but the transformers 4.57 environment is missing: run tests/make_tf4_env.sh")
    model, tokenizer = _save_folder(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_bd3lm.BD3LMForMaskedDiffusion"
    )
    code = CHILD.replace("FOLDER", repr(str(tmp_path))).replace("PROMPTS", repr(PROMPTS))
    result = run_python_without_project(code, cwd=tmp_path, python=python)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "pipeline_out.json").read_text())

    def texts(records: list) -> list[str]:
        return [r["generated_text"] for r in records]

    greedy = [p + _new_text(model, tokenizer, p, max_new_tokens=10)[0] for p in PROMPTS]
    assert [texts(r) for r in out["greedy"]] == [[t] for t in greedy]  # batched: padded on either side
    assert [texts(r) for r in out["greedy_one_by_one"]] == [[t] for t in greedy]
    assert len(set(greedy)) == len(PROMPTS)
    sampled = [
        _new_text(model, tokenizer, p, max_new_tokens=10, do_sample=True, temperature=0.7, seed=4)[0] for p in PROMPTS
    ]
    assert [texts(r) for r in out["sampled"]] == [[t] for t in sampled]
    threshold = [p + _new_text(model, tokenizer, p, max_new_tokens=10, confidence_threshold=0.3)[0] for p in PROMPTS]
    assert [texts(r) for r in out["threshold"]] == [[t] for t in threshold]
    topk = _new_text(
        model,
        tokenizer,
        PROMPTS[0],
        max_new_tokens=10,
        do_sample=True,
        temperature=1.2,
        top_k=8,
        seed=2,
        sampler="topk_confidence",
        tokens_per_step=2,
    )
    assert texts(out["topk"]) == [PROMPTS[0] + topk[0]]
    repeats = _new_text(
        model, tokenizer, PROMPTS[1], max_new_tokens=8, do_sample=True, temperature=0.7, seed=3, num_return_sequences=2
    )
    assert texts(out["repeats"]) == [PROMPTS[1] + t for t in repeats] and len(set(repeats)) == 2

    # the streamer gets the prompt, then each committed block, then end(); as from generate()
    ids = tokenizer(PROMPTS[1], return_tensors="pt", add_special_tokens=False).input_ids
    generated = model.generate(ids, max_new_tokens=10)
    new = generated[0, ids.shape[1] :].tolist()
    blocks = [new[i : i + 4] for i in range(0, len(new), 4)]
    assert out["stream"] == [ids.tolist(), *blocks, "end"]
    assert texts(out["streamed"]) == [greedy[1]]
    assert torch.equal(generated, model.generate(ids, max_new_tokens=10))
