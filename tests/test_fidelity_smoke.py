"""Smoke test of the fidelity study (`python -m bench.fidelity --quick`): every row trains a few steps and every
measurement runs; the checks are the ones that hold whatever the (tiny) training did."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from bd3lm_trainer.corpus import load_tokenizer
from bd3lm_trainer.evaluation import dataset_perplexity
from bench.fidelity import measures
from bench.fidelity.__main__ import main
from bench.fidelity.study import QUICK, ROWS, run_study
from bench.stats import paired_difference, summarise
from modeling_bd3lm import BD3LMForMaskedDiffusion


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    run_study(QUICK, root / "out", root / "work", command="pytest")
    return root, json.loads((root / "out" / "fidelity.json").read_text())


def test_every_row_is_trained_and_measured(study):
    root, results = study
    assert list(results["rows"]) == [r.name for r in ROWS]
    for name, row in results["rows"].items():
        assert row["train"]["steps"] == QUICK.steps, name
        n = row["nelbo"]
        assert math.isfinite(n["nelbo"]) and n["nelbo_se"] >= 0 and n["num_chunks"] == len(n["per_chunk"])
        assert n["ppl"] == pytest.approx(math.exp(n["nelbo"]))
    for name in ("tables.md", "ppl_by_model.png", "variance.png", "schedule_search.png", "genppl_vs_nfe.png"):
        assert (root / "out" / name).is_file(), name
    assert "Finding 4" in (root / "out" / "tables.md").read_text()
    # every row is scored on the same tokens, so the paired comparisons are well defined
    assert len({r["nelbo"]["num_tokens"] for r in results["rows"].values()}) == 1
    assert "bd3_l4 vs bd3_l8" in results["comparisons"] and "paper_order_holds" in results["comparisons"]


def test_l1_vectorised_nelbo_equals_the_token_by_token_nll(study):
    _, results = study
    for name in ("bd3_l1", "bd3_l1_linear"):
        eq = results["rows"][name]["l1_equivalence"]
        assert eq["max_abs_token_diff"] < 1e-4, name
        assert eq["vectorised_nll"] == pytest.approx(eq["sampling_path_nll"], abs=1e-5)


def test_variance_and_search_records(study):
    _, results = study
    rows = results["rows"]
    assert rows["bd3_l1"]["variance"]["t≡1"]["var"] == 0.0  # t ≡ 1 is deterministic
    assert rows["bd3_l1"]["variance"]["linear"]["var"] > 0.0
    for name in ("bd3_l4", "bd3_l8", "bd3_l16", "mdlm", "bd3_l4_linear"):
        search = rows[name]["train"]["search"]
        assert search["applied_in_training"] == (name in ("bd3_l4", "bd3_l8", "bd3_l16"))
        assert tuple(search["chosen"]) in {(t["eps_min"], t["eps_max"]) for t in search["table"]}
        assert rows[name]["variance"]["searched"]["interval"] == search["chosen"]
        assert rows[name]["variance"]["linear"]["var"] > 0.0
    assert "search" not in rows["ar"]["train"] and "variance" not in rows["ar"]


def test_generation_records(study):
    _, results = study
    for name, row in results["rows"].items():
        settings = {g["setting"]: g for g in row["generation"]}
        first = settings["ancestral" if name == "ar" else "first_hitting"]
        assert first["nfe_per_token"] == pytest.approx(1.0), name  # one token per network call
        for g in settings.values():
            assert 0 < g["nfe_per_token"] <= 1.0 and g["gen_ppl"] > 1.0 and g["num_samples"] == QUICK.gen_samples
    assert set(s["setting"] for s in results["rows"]["bd3_l4"]["generation"]) == {
        "first_hitting",
        *(f"confidence_threshold_{t:g}" for t in QUICK.thresholds),
    }


def test_nelbo_per_chunk_matches_dataset_perplexity(study):
    root, _ = study
    model = BD3LMForMaskedDiffusion.from_pretrained(str(root / "work" / "bd3_l4")).eval()
    tokenizer = load_tokenizer()
    texts = ["In the beginning God created the heaven and the earth. " * 6, "To be, or not to be: that is it. " * 5]
    chunks = measures.validation_chunks(texts, tokenizer, model.config.model_length)
    sums, counts = measures.nelbo_per_chunk(model, chunks, num_samples=2, seed=3, batch_size=2)
    ours = summarise(sums, counts)
    reference = dataset_perplexity(
        model, texts, tokenizer, batch_size=2, num_samples=2, seed=3, ignore_bos=True, progress=False
    )
    assert ours["nelbo"] == pytest.approx(reference.nelbo, abs=1e-9)
    assert ours["nelbo_se"] == pytest.approx(reference.std_error, abs=1e-9)
    assert ours["num_tokens"] == reference.num_tokens
    # the paired difference of a model with itself is exactly zero
    diff = paired_difference(sums, sums, counts)
    assert diff["diff"] == 0.0 and diff["diff_se"] == 0.0


def test_causal_judge_scores_like_the_causal_loss(study):
    root, _ = study
    model = BD3LMForMaskedDiffusion.from_pretrained(str(root / "work" / "ar")).eval()
    x = torch.randint(0, model.config.vocab_size - 1, (2, model.config.model_length))
    with torch.no_grad():
        logits = measures.CausalJudge(model)(input_ids=x).logits
        direct = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:])
        assert float(direct) == pytest.approx(float(measures.causal_lm_loss(model, x)), rel=1e-6)
    assert torch.isinf(logits[..., model.config.mask_token_id]).all()  # the mask token is never predicted


def test_rows_add_to_a_finished_study_and_retrain_a_missing_judge(study, tmp_path):
    """`--rows` keeps the rows measured before (same training key); without the AR model on disk it is trained again,
    deterministically, so the kept rows were judged by the same model."""
    root, before = study
    out, work = tmp_path / "out", tmp_path / "work"
    shutil.copytree(root / "out", out)
    shutil.copytree(root / "work" / "bd3_l4", work / "bd3_l4")
    run_study(QUICK, out, work, rows=("bd3_l4",), command="pytest")
    after = json.loads((out / "fidelity.json").read_text())
    assert list(after["rows"]) == list(before["rows"])
    assert (work / "ar" / "train_record.json").is_file()  # retrained as the judge
    assert after["rows"]["ar"]["nelbo"]["nelbo"] == before["rows"]["ar"]["nelbo"]["nelbo"]
    assert after["meta"]["ar_nelbo_before_retraining"] == before["rows"]["ar"]["nelbo"]["nelbo"]
    for name in ("bd3_l16", "mdlm"):  # neither trained nor measured again
        assert after["rows"][name] == before["rows"][name]
    assert after["rows"]["bd3_l4"]["nelbo"]["nelbo"] == before["rows"]["bd3_l4"]["nelbo"]["nelbo"]  # reused model
    assert "judged by the same model" in (out / "tables.md").read_text()


def test_command_line_rejects_bad_steps(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--steps", "0"])
    assert err.value.code == 2 and "--steps must be positive" in capsys.readouterr().err


def test_the_package_leaves_a_1e3_floor_unenforced_so_the_study_needs_no_workaround():
    """The study used to move a float32 lower bound of 1e-3 (which reads back as 0.0010000000475) just below 1e-3 so
    that rejection resampling would not enforce it. The package's one owner of that rule, `resampling_bounds` (which
    `draw_noise` applies to the model's buffers), already compares in float32: both values give the same bounds."""
    from modeling_bd3lm.noise_schedule_bd3lm import resampling_bounds
    from tests.conftest import tiny_config

    model = BD3LMForMaskedDiffusion(tiny_config(resample=True))
    model.set_noise_interval(1e-3, 0.6)
    lo, hi = model.training_noise_interval()
    assert lo > 1e-3  # float32 buffers
    below_floor = float(torch.tensor(1e-3, dtype=torch.float32).nextafter(torch.tensor(0.0)))  # the old workaround
    assert resampling_bounds((lo, hi), True) == resampling_bounds((below_floor, hi), True) == (0.0, hi)
    model.set_noise_interval(0.3, 0.8)  # a clipped floor is enforced
    assert resampling_bounds(model.training_noise_interval(), True)[0] == pytest.approx(0.3)
