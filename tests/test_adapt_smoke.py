"""The adaptation study (`python -m bench.adapt`) on its reduced configuration (a tiny random Llama, seconds), and its
measurements checked against direct computations."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from bd3lm_trainer.evaluation import judge_continuations
from bench.adapt import measures
from bench.adapt.__main__ import main
from bench.adapt.study import QUICK, CPUBudgetCallback, convert, load_source


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    assert main(["--quick", "--work-dir", str(root / "work"), "--output-dir", str(root / "out")]) == 0
    return root, json.loads((root / "out" / "adapt.json").read_text())


@pytest.fixture(scope="module")
def tiny():
    source, tokenizer = load_source(QUICK)
    return source, tokenizer


def test_every_stage_writes_its_results(study):
    root, results = study
    assert set(results["methods"]) == {"lora", "full"}
    for method, m in results["methods"].items():
        assert m["ledger"]["finished"] and m["evals"], method
        final = m["evals"][max(m["evals"], key=int)]
        assert final["full_sweep"] and set(final["speed"]) == {"batch1", "batch2"}
        assert {"ar_greedy", "ar_sampled"} <= set(final["speed"]["batch1"])
        assert math.isfinite(final["heldout"]["ppl"]) and final["heldout"]["chunks"] == QUICK.eval_chunks
        for step, e in m["evals"].items():  # along training: every setting (first seed) and batch-1 speed
            assert set(e["samples"]) == {s.name for s in QUICK.settings(True)}, (method, step)
            if e is not final:
                assert not e["full_sweep"] and set(e["speed"]) == {"batch1"}, (method, step)
    assert sum(len(m["evals"]) for m in results["methods"].values()) > len(results["methods"])  # interim ones exist
    lora = results["methods"]["lora"]["ledger"]["trainable_parameters"]
    assert 0 < lora < results["methods"]["full"]["ledger"]["trainable_parameters"]
    assert not results["converted"]["full_sweep"] and "speed" not in results["converted"]
    assert len(results["targets"]) == 6
    tables = (root / "out" / "tables.md").read_text()
    assert "## Targets" in tables and "## Decode speed, lora" in tables and "## Profile" in tables
    assert set(results["profile"]) == {"converted", "lora checkpoint-4", "full checkpoint-4"}
    cost = results["call_cost"]
    assert cost["model"] == "lora checkpoint-4" and "## Profile: where decode time goes" in tables
    for batch in QUICK.speed_batches:
        row = cost[f"batch{batch}"]
        # the AR decode calls its network once per new token; BD3 at threshold 0.9 at least once per L' tokens
        assert row["ar"]["model_calls"] == QUICK.speed_new_tokens
        assert row["bd3"]["model_calls"] >= QUICK.speed_new_tokens // QUICK.block_size
        for name in ("ar", "bd3"):
            r = row[name]
            assert 0 < r["trunk_s"] <= r["model_s"] <= r["total_s"] and r["trunk_calls"] == r["model_calls"]
    for name in ("training.png", "genppl_vs_tokens_per_call.png"):
        assert (root / "out" / name).is_file()


def test_a_rerun_resumes_and_measures_nothing_again(study):
    root, _ = study
    work = root / "work"
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*.json")}
    assert main(["--quick", "--work-dir", str(work), "--output-dir", str(root / "out2"), "--stage", "eval"]) == 0
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.json")} == before


def test_the_report_keeps_evaluations_whose_checkpoint_weights_were_deleted(study, tmp_path):
    """Full fine-tuning checkpoints are ~1.6 GB each with the optimizer: the study's record of a checkpoint is its
    evaluation file and ledger entry, so the report must not depend on the weights still being on disk."""
    import shutil

    from bench.adapt.report import gather

    root, results = study
    work = tmp_path / "work"
    shutil.copytree(root / "work", work)
    for folder in (work / "full").glob("checkpoint-*"):
        shutil.rmtree(folder)
    kept = gather(QUICK, work)["methods"]
    assert set(kept["full"]["evals"]) == set(results["methods"]["full"]["evals"]) != set()
    assert kept["lora"]["evals"].keys() == results["methods"]["lora"]["evals"].keys()


def test_the_exported_adapter_rebuilds_the_trained_model(study, tiny):
    """`--stage ship` writes the LoRA factors and the mask row in float16 with the training log; converting the source
    again and loading them gives the last checkpoint's model (up to float16 rounding)."""
    import copy

    from safetensors.torch import load_file

    from bench.adapt.study import checkpoints, load_adapted

    root, _ = study
    work = root / "work"
    assert main(["--quick", "--work-dir", str(work), "--output-dir", str(root / "out3"), "--stage", "ship"]) == 0
    folder = root / "out3" / "adapter"  # next to the report: the committed results
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert any("trainable_tokens" in k for k in weights) and any("lora_A" in k for k in weights)
    log = json.loads((folder / "training_log.json").read_text())
    assert log["checkpoint"] == "checkpoint-4" and log["ledger"]["finished"]
    source, tokenizer = tiny
    exported = load_adapted(QUICK, "lora", folder, copy.deepcopy(source), tokenizer)
    trained = load_adapted(QUICK, "lora", checkpoints(work / "lora")[-1], copy.deepcopy(source), tokenizer)
    x = torch.tensor([list(range(10, 10 + QUICK.model_length))])
    noisy = x.clone()
    noisy[:, 4::3] = trained.config.mask_token_id
    converted = load_adapted(QUICK, "lora", None, copy.deepcopy(source), tokenizer)
    with torch.no_grad():
        a, b, c = (m(input_ids=x, noisy_input_ids=noisy).logits for m in (exported, trained, converted))
    # float16 rounding moves the logits far less than the 4 training steps did (so the adapter is really loaded)
    assert (a - b).abs().max() < (b - c).abs().max() / 20


def test_ar_nll_is_the_hf_loss(tiny):
    source, tokenizer = tiny
    chunks = [list(range(5, 5 + 16)), list(range(100, 116))]
    sums = measures.ar_nll_per_chunk(source, chunks, batch_size=2)
    for chunk, value in zip(chunks, sums):
        ids = torch.tensor([chunk])
        with torch.no_grad():
            loss = source(input_ids=ids, labels=ids).loss
        assert float(value) == pytest.approx(float(loss) * (len(chunk) - 1), rel=1e-6)


def test_judge_scores_only_the_continuation_given_the_prompt(tiny):
    source, tokenizer = tiny
    prompt, text = "And God said,", " Let there be light: and there was light."
    continuation = tokenizer(text, add_special_tokens=False)["input_ids"]
    judged = judge_continuations(source, tokenizer, [prompt, prompt], [continuation, continuation])
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + continuation])
    with torch.no_grad():
        logp = source(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    nll = -logp[torch.arange(len(targets)), targets][len(p) - 1 :]
    assert judged["judge_tokens"] == 2 * len(continuation)
    assert judged["gen_ppl"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


def test_samples_have_exactly_the_new_tokens_and_no_special_token(tiny):
    source, tokenizer = tiny
    model = convert(QUICK, __import__("copy").deepcopy(source), tokenizer)
    specials = set(measures.special_ids(tokenizer))
    for setting in (measures.Setting("topk_confidence", 2, True), measures.Setting("confidence_threshold", 0.3, False)):
        out = measures.bd3_samples(
            model, tokenizer, ["And God said,", "To be"], 8, setting, top_p=0.9, temperature=1.0, seed=0
        )
        assert [len(c) for c in out["continuations"]] == [8, 8]
        assert not specials & {t for c in out["continuations"] for t in c}
        if setting.sampler == "topk_confidence":  # k=2 reveals two per call: 4 calls per row for 8 tokens at L'=4
            assert out["calls"] == 2 * 4
    ar = measures.ar_samples(source, tokenizer, ["And God said,", "To be"], 8, True, top_p=0.9, temperature=1.0, seed=0)
    assert [len(c) for c in ar["continuations"]] == [8, 8]
    assert not specials & {t for c in ar["continuations"] for t in c}


def test_profile_of_a_one_token_block_model_is_the_ar_loss(tiny):
    """At L'=1 with token shift, a masked block of one token is predicted from the clean prefix alone: every column of
    the profile is the source's AR NLL."""
    import copy

    source, tokenizer = tiny
    cfg = __import__("dataclasses").replace(QUICK, block_size=1)
    model = convert(cfg, copy.deepcopy(source), tokenizer)
    chunks = [list(range(5, 5 + 16)), list(range(300, 316))]
    ar = measures.ar_token_nll(source, chunks, 2)
    profile = measures.block_position_profile(model, chunks, 2, ar)
    assert profile["all_masked"] == pytest.approx(profile["ar"], abs=1e-5)
    assert profile["left_revealed"] == pytest.approx(profile["ar"], abs=1e-5)
    assert profile["ar"] == pytest.approx(float(ar.mean()), abs=1e-9)  # tokens 1.. (blocks 1.. at L'=1)


def test_settings_map_to_generate_arguments():
    assert measures.Setting("confidence_threshold", 0.7, False).kwargs() == {
        "sampler": "confidence_threshold",
        "do_sample": False,
        "confidence_threshold": 0.7,
    }
    assert measures.Setting("topk_confidence", 3).kwargs() == {
        "sampler": "topk_confidence",
        "do_sample": True,
        "tokens_per_step": 3,
    }
    assert measures.Setting("confidence_threshold", 0.9, False).name == "thr0.9_greedy"
    names = [s.name for s in QUICK.settings(True)]
    assert len(names) == len(set(names)) and "one_sampled" in names


def test_cpu_budget_resumes_from_the_checkpoint_ledger(tmp_path, monkeypatch):
    ledger = tmp_path / "ledger.json"
    ledger.write_text(
        json.dumps(
            {
                "checkpoints": {"7": {"cpu_s": 120.0, "wall_s": 300.0, "step": 7}},
                "log": [
                    {"step": 5, "loss": 3.0, "cpu_s": 90.0, "wall_s": 1.0},
                    {"step": 9, "loss": 2.0, "cpu_s": 150.0, "wall_s": 2.0},
                ],
            }
        )
    )
    clock = [1000.0]
    monkeypatch.setattr("bench.adapt.study.time.process_time", lambda: clock[0])
    callback = CPUBudgetCallback(200.0, [60.0, 180.0], ledger, tokens_per_step=8)
    state = types.SimpleNamespace(global_step=7, max_steps=10**6)
    callback.on_train_begin(None, state, None)
    assert callback.spent() == 120.0 and [r["step"] for r in callback.log] == [5]  # the log after step 7 is dropped
    control = types.SimpleNamespace(should_save=False, should_training_stop=False)
    clock[0] += 30.0  # 150 s: no new mark (60 s was reached before the checkpoint)
    state.global_step = 8
    callback.on_step_end(None, state, control)
    assert not control.should_save
    clock[0] += 40.0  # 190 s: crosses the 180 s mark
    callback.on_step_end(None, state, control)
    assert control.should_save and not control.should_training_stop
    control.should_save = False
    clock[0] += 15.0  # 205 s: over budget
    callback.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop


def test_converting_twice_with_one_tokenizer_without_a_mask_token():
    """The evaluation converts a fresh copy of the source for every checkpoint with the same tokenizer: the conversion
    must not leave `<|mask|>` in it (SmolLM2's tokenizer has no mask token; a tiny Llama with its vocabulary here)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from bd3lm_trainer.pretrained import load_smollm2

    _, tokenizer = load_smollm2(tokenizer_only=True)
    torch.manual_seed(0)
    source = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    first = convert(QUICK, copy.deepcopy(source), tokenizer)
    second = convert(QUICK, copy.deepcopy(source), tokenizer)
    assert tokenizer.mask_token is None and len(tokenizer) == 49152
    assert first.config.mask_token_id == second.config.mask_token_id == 49152
    assert torch.equal(first.get_input_embeddings().weight, second.get_input_embeddings().weight)
