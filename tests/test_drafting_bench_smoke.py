"""The drafting study (`python -m bench.drafting`) on its tiny configuration (a random Llama, seconds): every stage
writes its results, a rerun resumes, and the report's numbers are the direct computations from the stage files."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
import torch

from bench.drafting import measures
from bench.drafting.__main__ import main
from bench.drafting.measures import KINDS, TINY, break_even, summarise_cost


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafting")
    assert main(["--tiny", "--work-dir", str(root / "work"), "--output-dir", str(root / "out")]) == 0
    return root, json.loads((root / "out" / "drafting.json").read_text())


def test_every_stage_writes_its_results(study):
    root, results = study
    cost = results["cost"]
    assert set(cost["seconds"]) == {
        f"{k}/{d}/b{b}/n{n}" for k in KINDS for d in TINY.dtypes for b in TINY.batches for n in TINY.ns
    }
    assert all(len(times) == TINY.repeats and min(times) > 0 for times in cost["seconds"].values())
    assert len(cost["load_average_before"]) == 3 and len(cost["load_average_after"]) == 3
    assert cost["config"]["threads"] == TINY.threads
    for curve in results["cost_summary"].values():
        assert curve["1"]["ratio"] == 1.0
    acc = results["acceptance"]
    assert set(acc["drafters"]) == {"converted"} and set(acc["drafters"]["converted"]) == {
        str(k) for k in TINY.draft_ks
    }
    for k, est in acc["drafters"]["converted"].items():
        assert est["blocks"] == sum(est["blocks_per_row"]) > 0 and len(est["match_rate"]) == int(k) - 1
    assert len(acc["continuations"]) == len(TINY.prompts)
    tables = (root / "out" / "tables.md").read_text()
    assert "## Cost of one cached forward" in tables and "## Break-even" in tables and "## Acceptance" in tables
    assert (root / "out" / "cost_curve.png").is_file()


def test_a_rerun_measures_nothing_again(study):
    root, _ = study
    work = root / "work"
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*.json")}
    assert main(["--tiny", "--work-dir", str(work), "--output-dir", str(root / "out2")]) == 0
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.json")} == before


def test_an_interrupted_cost_curve_resumes_at_its_next_repeat(study, tmp_path):
    root, _ = study
    shutil.copytree(root / "work", tmp_path / "work")
    path = tmp_path / "work" / "cost.json"
    stored = json.loads(path.read_text())
    stored["seconds"] = {name: times[:1] for name, times in stored["seconds"].items()}  # as if stopped after repeat 1
    path.write_text(json.dumps(stored))
    assert main(["--tiny", "--stage", "cost", "--work-dir", str(tmp_path / "work")]) == 0
    resumed = json.loads(path.read_text())["seconds"]
    assert all(len(t) == TINY.repeats and t[0] == stored["seconds"][n][0] for n, t in resumed.items())
    with pytest.raises(ValueError, match="work-dir"):  # another protocol never appends to a stored curve
        main(["--tiny", "--stage", "cost", "--threads", "2", "--repeats", "5", "--work-dir", str(tmp_path / "work")])


def test_ratios_and_break_even_are_the_medians_of_the_stage_file(study):
    from bd3lm_trainer.evaluation import geometric_alpha

    _, results = study
    seconds = results["cost"]["seconds"]
    summary = summarise_cost(results["cost"])
    for kind in KINDS:
        one, four = seconds[f"{kind}/float32/b2/n1"], seconds[f"{kind}/float32/b2/n4"]
        row = summary[f"{kind}/float32/b2"][4]
        assert row["seconds"] == statistics.median(four)
        assert row["ratio"] == statistics.median(a / b for a, b in zip(four, one))
        assert row["min_seconds"] == min(four) and row["min_ratio"] == min(four) / min(one)
    rows = {(r["k"], r["variant"]): r for r in break_even(seconds, "float32", 1, (2, 4))}
    step = seconds["source_last/float32/b1/n1"]
    two_pass = [(a + b) / s for a, b, s in zip(seconds["bd3/float32/b1/n2"], seconds["source_all/float32/b1/n2"], step)]
    assert rows[(2, "2-pass")]["cycle_vs_ar"] == pytest.approx(statistics.median(two_pass))  # paired within a repeat
    one_forward = [a / s for a, s in zip(seconds["bd3/float32/b1/n8"], step)]
    assert rows[(4, "one-forward")]["cycle_vs_ar"] == pytest.approx(statistics.median(one_forward))
    low = {(r["k"], r["variant"]): r for r in break_even(seconds, "float32", 1, (2, 4), "min")}
    assert low[(4, "one-forward")]["cycle_vs_ar"] == pytest.approx(min(seconds["bd3/float32/b1/n8"]) / min(step))
    for row in rows.values():
        if row["cycle_vs_ar"] is not None and 1 <= row["cycle_vs_ar"] <= row["k"]:
            assert row["alpha"] == pytest.approx(geometric_alpha(row["cycle_vs_ar"], row["k"]))
        elif row["cycle_vs_ar"] is not None and row["cycle_vs_ar"] > row["k"]:
            assert row["alpha"] is None  # more tokens per cycle than a cycle can emit: out of reach
    assert rows[(4, "quadratic")]["cycle_vs_ar"] is None  # 20 positions were not measured


@torch.no_grad()
def test_every_timed_call_leaves_the_cache_at_the_prefix():
    """Each setting must see the same prefix: a call that kept its keys would make the next call longer."""
    source, tokenizer = measures.load_source(TINY)
    bd3 = measures.convert(TINY, source, tokenizer)
    prefix, ids = torch.randint(0, 90, (2, TINY.prefix)), torch.randint(0, 90, (2, 4))
    for kind in KINDS:
        model = bd3 if kind == "bd3" else source
        cache = measures._prefill(kind, model, prefix)
        for _ in range(2):
            measures._call(kind, model, cache, ids)
            assert cache.get_seq_length() == TINY.prefix, kind


def test_the_overhead_stage_times_every_mode_and_reports_before_and_after(tmp_path):
    """`python -m bench.drafting.overhead` on the tiny Llama: every (mode, batch) timed, the network time within the
    total, the calls those of the output; two labels give the side-by-side table with the tokens compared."""
    import copy

    from bench.drafting import overhead

    assert overhead.main(["--tiny", "--repeats", "1", "--label", "after", "--work-dir", str(tmp_path)]) == 0
    after = json.loads((tmp_path / "overhead-after.json").read_text())
    assert set(after["summary"]) == {f"{m}/b{b}" for m in overhead.MODES for b in overhead.TINY.batches}
    for key, samples in after["samples"].items():
        assert all(0 < n < t for n, t in zip(samples["network"], samples["total"], strict=True)), key
        assert after["summary"][key]["calls"] >= 1
    before = copy.deepcopy(after)
    before["label"] = "before"
    before["sequences"]["diffusion/b1"][0][-1] += 1  # a changed token shows as False
    (tmp_path / "overhead-before.json").write_text(json.dumps(before))
    table = overhead.report(tmp_path)
    assert "outside after/before" in table and table.count("| True |") == len(after["summary"]) - 1
    assert "| diffusion/b1 |" in table and table.split("| diffusion/b1 |")[1].split("\n")[0].endswith("| False |")
