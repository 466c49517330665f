"""The drafter study (`python -m bench.drafter`) on its tiny configuration (a random Llama, seconds), and its parts
checked against direct computations: the training layout is the measuring layout, the seed-plus-masks loss is the
drafts' plain cross-entropy, the gated adapter leaves the clean stream alone, pooling equals one pass over all rows."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil

import pytest
import torch

from bd3lm_trainer.evaluation import estimate_acceptance
from bd3lm_trainer.evaluation.drafting import _layout
from bench.drafter import measure, study
from bench.drafter.__main__ import main
from bench.drafter.measure import METHODS, VARIANTS, best_checkpoints, variant_key

CFG = study.TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafter")
    assert main(["--tiny", "--work-dir", str(root / "work"), "--output-dir", str(root / "out")]) == 0
    work = ["--tiny", "--work-dir", str(root / "work"), "--output-dir", str(root / "out")]
    assert main([*work, "--stage", "speed-batch", "--dtypes", "float32"]) == 0
    assert main([*work, "--stage", "report"]) == 0
    return root


@pytest.fixture(scope="module")
def tiny():
    return study.load_source(CFG)


def test_every_stage_writes_its_results(run):
    results = json.loads((run / "out" / "drafter.json").read_text())
    assert results["data"]["data"]["prompts"] == len(CFG.train_chat) + len(CFG.train_corpus) + len(CFG.train_extra)
    assert results["data"]["heldout"]["kinds"] == sorted(CFG.heldout)
    training = results["training"]["seed_plus_masks"]
    assert training["finished"] and training["step"] == CFG.max_steps
    assert [r["step"] for r in training["log"]] == list(range(1, CFG.max_steps + 1))
    names = list(results["measured"])
    assert names == ["converted", "seed_plus_masks/checkpoint-1", "seed_plus_masks/checkpoint-4"]
    for row in results["measured"].values():
        assert set(row["acceptance"]) == set(CFG.heldout) | {"all"}
        for per_kind in row["acceptance"].values():
            assert set(per_kind) == {variant_key(v, k) for v in VARIANTS for k in CFG.measure_block_sizes}
    tables = (run / "out" / "tables.md").read_text()
    assert "## Tokens per cycle" in tables and "seed_plus_masks/checkpoint-4" in tables
    assert "## Real greedy" in tables and "one_forward drafts" in tables
    if importlib.util.find_spec("matplotlib") is not None:
        assert (run / "out" / "drafter.png").stat().st_size > 0
    timed = {(r["name"], r["dtype"]) for r in results["speed"].values()}
    best = set(best_checkpoints(CFG, run / "work"))
    assert timed == {(n, d) for n in {"converted"} | best for d in ("float32", "bfloat16")} and best
    for run_ in results["speed"].values():
        assert [r["kind"] for r in run_["rows"]] == list(CFG.heldout)  # speed_prompts_per_kind=1
        for r in run_["rows"]:
            assert set(r["methods"]) == set(METHODS)
            for variant in VARIANTS:  # the prefill's token, then each cycle's accepted drafts + 1 (the last may be cut)
                assert r["new_tokens"] <= 1 + sum(r["methods"][variant]["acceptance_lengths"])
            if run_["dtype"] == "float32":  # exact in float32 (bfloat16 is reported, not promised)
                assert all(m["equal_to_generate"] for m in r["methods"].values())
    assert "## Batch 8" in tables and {r["name"] for r in results["speed_batch"].values()} == {"converted"} | best
    for run_ in results["speed_batch"].values():
        for row in run_["rows"]:  # batched draft-and-verify: every row its own greedy text
            assert all(m["rows_equal_to_alone_float32"] == row["rows"] for m in row["methods"].values())


def test_resumed_training_continues_where_it_stopped(run, tmp_path, capsys):
    from safetensors.torch import load_file

    work = tmp_path / "work"
    shutil.copytree(run / "work", work)
    folder = work / "seed_plus_masks"
    shutil.rmtree(folder / "checkpoint-4")  # as if interrupted after the first checkpoint
    capsys.readouterr()
    study.run_train(CFG, work)
    printed = capsys.readouterr().out
    assert "resumed from checkpoint-1" in printed and "step 1 " not in printed and "step 2 " in printed
    # the same weights as the uninterrupted run: adapter, optimizer moments and data order all resumed
    resumed = load_file(str(folder / "checkpoint-4" / "adapter_model.safetensors"))
    original = load_file(str(run / "work" / "seed_plus_masks" / "checkpoint-4" / "adapter_model.safetensors"))
    assert resumed.keys() == original.keys()
    for name in original:
        torch.testing.assert_close(resumed[name], original[name], rtol=0, atol=0)
    state = json.loads((folder / "checkpoint-4" / "state.json").read_text())
    assert state["finished"] and [r["step"] for r in state["log"]] == list(range(1, CFG.max_steps + 1))
    assert set(state["checkpoints"]) == {"checkpoint-1", "checkpoint-4"}
    assert study.batch_indices(7, 3, 5, 0) == study.batch_indices(7, 3, 5, 0)  # the data order is a function of step


def test_training_layout_is_the_measuring_layout():
    rows = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25, 26], [30, 31, 32, 33, 34, 35]]
    prompt_lengths = [3, 4, 1]
    batch = study.seed_plus_masks_batch(rows, prompt_lengths, 4, 16, mask_id=99, pad_id=0)
    x_0, x_t, attention_mask, _ = _layout(rows, prompt_lengths, 4, 16, 99, 0)
    width = x_0.shape[1]
    assert torch.equal(batch["input_ids"][:, :width], x_0)
    assert torch.equal(batch["noisy_input_ids"][:, :width], x_t)
    assert torch.equal(batch["attention_mask"][:, :width], attention_mask)
    # row 0: prompt [5, 6, 7] after one pad; blocks after it: [8, M, M, M], [12, M]
    assert batch["noisy_input_ids"][0, :10].tolist() == [0, 5, 6, 7, 8, 99, 99, 99, 12, 99]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    with pytest.raises(ValueError, match="width"):
        study.seed_plus_masks_batch(rows, prompt_lengths, 4, 8, 99, 0)
    # recipe all_masks: the layout of the one-forward estimate, the seed masked too
    masked = study.seed_plus_masks_batch(rows, prompt_lengths, 4, 16, mask_id=99, pad_id=0, mask_seed=True)
    assert torch.equal(masked["noisy_input_ids"][:, :width], _layout(rows, prompt_lengths, 4, 16, 99, 0, True)[1])
    assert masked["noisy_input_ids"][0, :10].tolist() == [0, 5, 6, 7, 99, 99, 99, 99, 99, 99]


def test_seed_plus_masks_loss_is_the_drafts_cross_entropy(tiny):
    source, tokenizer = tiny
    model = study.convert(CFG, source, tokenizer).eval()
    rows = [list(range(10, 21)), list(range(30, 38))]
    batch = study.seed_plus_masks_batch(rows, [3, 5], 4, 16, model.config.mask_token_id, 0)
    with torch.no_grad():
        out = model(**batch)
    masked = batch["noisy_input_ids"] == model.config.mask_token_id
    logits = out.logits.float().clone()
    logits[..., model.config.mask_token_id] = float("-inf")
    ce = -torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][..., None]).squeeze(-1)
    torch.testing.assert_close(out.token_loss[masked], ce[masked])  # weight 1: t = 1 in every block
    assert (out.token_loss[~masked] == 0).all()


def test_gated_drafter_changes_drafts_not_the_clean_stream(run, tiny):
    source, tokenizer = tiny
    converted = study.load_drafter(CFG, source, tokenizer, None)
    trained = study.load_drafter(CFG, source, tokenizer, run / "work" / "seed_plus_masks" / "checkpoint-4")
    rows = [list(range(10, 21))]
    batch = study.seed_plus_masks_batch(rows, [3], 4, 16, converted.config.mask_token_id, 0)
    inputs = {k: batch[k] for k in ("input_ids", "noisy_input_ids", "attention_mask")}
    with torch.no_grad():
        a = converted(**inputs, output_clean_logits=True)
        b = trained(**inputs, output_clean_logits=True)
    torch.testing.assert_close(a.clean_logits, b.clean_logits)
    masked = batch["noisy_input_ids"] == converted.config.mask_token_id
    assert (a.logits[masked] - b.logits[masked]).abs().max() > 1e-4


def test_pooled_kinds_equal_one_pass_over_all_rows(tiny):
    """Rows of one block after the prompt, whose continuation copies the drafter's own drafts for the first m offsets
    (a block's drafts see only its seed and earlier clean tokens, not its own): accepted lengths m are known, and
    differ between the two kinds, which have different numbers of blocks."""
    source, tokenizer = tiny
    model = study.load_drafter(CFG, source, tokenizer, None)
    vocab, mask_id = model.config.vocab_size, model.config.mask_token_id
    prompts = [[3 + i, 40 + 7 * i, 90 + i] for i in range(6)]
    plain = [p + [200 + i, 1, 1, 1] for i, p in enumerate(prompts)]
    drafts = estimate_acceptance(model, plain, [3] * 6, block_size=4).drafts
    wanted = [3, 2, 0, 1, 1, 3]
    heldout = []
    for i, (p, d, m) in enumerate(zip(prompts, drafts, wanted)):
        junk = [(t + 1) % vocab if (t + 1) % vocab != mask_id else (t + 2) % vocab for t in d]
        continuation = [200 + i] + d[:m] + junk[m:]
        heldout.append({"kind": "a" if i < 2 else "b", "prompt_ids": p, "continuation": continuation})
    pooled = measure.measure_one(dataclasses.replace(CFG, measure_block_sizes=(4,)), model, heldout)
    assert pooled["a"]["k4"]["accepted_lengths"] == [3, 2] and pooled["b"]["k4"]["accepted_lengths"] == [0, 1, 1, 3]
    direct = estimate_acceptance(model, [d["prompt_ids"] + d["continuation"] for d in heldout],
                                 [len(d["prompt_ids"]) for d in heldout], block_size=4)  # fmt: skip
    pooled = pooled["all"]["k4"]
    assert pooled["accepted_lengths"] == direct.accepted_lengths == wanted
    assert pooled["tokens_per_cycle"] == pytest.approx(direct.tokens_per_cycle)
    assert pooled["alpha"] == pytest.approx(direct.alpha)
    assert pooled["match_rate"] == pytest.approx(direct.match_rate)
    assert pooled["conditional_acceptance"] == pytest.approx(direct.conditional_acceptance, nan_ok=True)


def test_exported_adapter_drafts_like_its_checkpoint(run, tiny, tmp_path):
    source, tokenizer = tiny
    checkpoint = run / "work" / "seed_plus_masks" / "checkpoint-4"
    target = study.export_adapter(checkpoint, tmp_path / "adapter")
    assert json.loads((target / "training_log.json").read_text())["step"] == CFG.max_steps
    trained, exported = (study.load_drafter(CFG, source, tokenizer, path) for path in (checkpoint, target))
    batch = study.seed_plus_masks_batch([list(range(10, 21))], [3], 4, 16, trained.config.mask_token_id, 0)
    inputs = {k: batch[k] for k in ("input_ids", "noisy_input_ids", "attention_mask")}
    with torch.no_grad():
        a, b = trained(**inputs).logits, exported(**inputs).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-3)  # float16 factors


def test_bad_recipe_is_refused(tmp_path):
    with pytest.raises(ValueError, match="recipe"):
        study.run_train(dataclasses.replace(CFG, recipe="nope"), tmp_path)


def test_run_names_and_training_data_of_each_setting(tmp_path, tiny):
    """Each training setting gets its own folder (the first slice's names unchanged); `--data corpus` trains on chunks
    of the embedded corpus, one clean block then the rest; an unknown data name is refused."""
    replace = dataclasses.replace
    assert study.run_name(CFG) == "seed_plus_masks"
    assert study.run_name(replace(CFG, recipe="random", data="corpus")) == "random-corpus"
    assert study.run_name(replace(CFG, data="sampled", lora_preset="attention")) == "seed_plus_masks-sampled-attention"
    assert study.run_name(replace(CFG, recipe="all_masks", block_size=8)) == "all_masks-k8"
    _, tokenizer = tiny
    rows = study.training_rows(replace(CFG, data="corpus"), tmp_path, tokenizer)
    assert len(rows) == CFG.corpus_rows
    assert all(len(r["prompt_ids"]) == CFG.block_size and len(r["prompt_ids"] + r["continuation"]) == CFG.model_length
               for r in rows)  # fmt: skip
    with pytest.raises(ValueError, match="data"):
        study.training_rows(replace(CFG, data="nope"), tmp_path, tokenizer)
