"""The benchmark suite starts and writes valid results on a tiny setting (no timing is asserted: speed lives in
bench/results), and the analytic FLOP count behind MFU equals torch's FlopCounterMode."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.__main__ import main, parse_args
from bench.bench_generation import AR_MODE, MODES, RNG_MODES
from bench.bench_training import make_step
from bench.common import build_config, interleaved_times, median_ratio
from modeling_bd3lm import BD3LMForMaskedDiffusion


def test_suite_writes_valid_json(tmp_path):
    main(["--smoke", "--out", str(tmp_path), "--no-plots", "--device", "cpu"])
    (json_path,) = tmp_path.glob("*.json")
    results = json.loads(json_path.read_text())
    assert (tmp_path / f"{results['machine_name']}.md").read_text().startswith("# Benchmark results")
    assert {"cpu", "torch", "transformers"} <= set(results["machine"])

    (training,) = results["training"]
    assert training["mode"] == "smoke" and training["peak_flops_per_s"] > 0
    measured = {(r["pass"], r["attn"]) for r in training["rows"]}
    assert {("vectorised", "sdpa"), ("ar", "eager"), ("mdlm", "sdpa"), ("per_block_loop", "sdpa")} <= measured
    for row in training["rows"]:
        assert len(row["times"]) >= 1 and row["seconds"] > 0 and row["flops"] > 0 and 0 < row["mfu"]
    vectorised = next(r for r in training["rows"] if r["pass"] == "vectorised" and r["attn"] == "sdpa")
    assert vectorised["over_ar"] > 0
    compiled = next(r for r in training["rows"] if r["pass"] == "compiled")  # torch.compile(fullgraph=True) step
    assert compiled["group"] == "compile" and compiled["over_vectorised"] > 0

    (generation,) = results["generation"]
    assert {r["mode"] for r in generation["rows"] if r["group"] == "samplers"} == {*MODES, AR_MODE}
    for row in generation["rows"]:
        assert row["tokens_per_s"] > 0 and row["calls_per_token"] > 0
    assert {r["mode"] for r in generation["rows"] if r["group"] == "rng"} == set(RNG_MODES)
    assert sum(r.get("per_row_over_shared", 0) > 0 for r in generation["rows"]) == len(RNG_MODES) // 2
    topk = next(r for r in generation["rows"] if r["mode"].startswith("topk_confidence"))
    assert topk["tokens_per_call"] == pytest.approx(2.0)  # k = 2 tokens per call, exactly
    assert [m["multiple"] for m in generation["memory"]] == [1, 4, 10]
    for m in generation["memory"]:
        assert m["kv_bytes_per_token"] == m["formula_bytes_per_token"]
        assert m["cached_tokens"] <= m["model_length"]

    names = {t["target"] for t in results["targets"]}
    assert {"cached / uncached tokens/s", "KV-cache bytes per token", "peak memory at 10x vs 1x model_length"} <= names
    assert all(t["met"] in (True, False, None) for t in results["targets"])


@pytest.mark.parametrize("kind", ["vectorised", "ar", "mdlm", "per_block_loop"])
def test_flop_count_matches_flop_counter(kind):
    """With eager attention every product is a visible mm/addmm/bmm: the counter sees exactly what we count."""
    state = BD3LMForMaskedDiffusion(build_config("test", 32, 4, "eager")).state_dict()
    step, counted = make_step(kind, "test", 16, 4, 3, "eager", state=state, device=torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        step()
    assert counted == counter.get_total_flops()


def test_interleaved_times_rotates_and_pairs():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times, _ = interleaved_times(candidates, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(t) == 3 for t in times.values())
    assert median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0


def test_cli_rejects_a_missing_model_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "--model" in capsys.readouterr().err
