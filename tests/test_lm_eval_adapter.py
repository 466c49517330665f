"""The lm-evaluation-harness adapter (`bd3lm_trainer.evaluation.lm_eval_adapter`), run offline on tiny local tasks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional extra `bd3lm[eval]`")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from bd3lm_trainer.corpus import load_tokenizer  # noqa: E402
from bd3lm_trainer.evaluation import score_continuations  # noqa: E402
from bd3lm_trainer.evaluation.lm_eval_adapter import BD3LMEvalHarness  # noqa: E402
from tests.conftest import random_model  # noqa: E402

QUESTIONS = [
    {"question": "In the beginning God created the", "choices": [" heaven", " sea", " stone"], "answer": 0},
    {"question": "To be, or not to", "choices": [" be", " go"], "answer": 0},
    {"question": "And God said, Let there be", "choices": [" light", " night", " dust"], "answer": 0},
    {"question": "Now is the winter of our", "choices": [" discontent", " summer"], "answer": 0},
]
DOCUMENTS = [{"text": "In the beginning God created the heaven and the earth."}, {"text": "To be, or not to be."}]


def _tiny(block_size: int, **overrides):
    return random_model(
        vocab_size=8192, hidden_dim=32, n_heads=2, n_blocks=1, cond_dim=16, block_size=block_size, **overrides
    )


def _requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in arguments]


@torch.no_grad()
def _ar_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) of a block-size-1 model, one sampling pass per position, and greediness."""
    mask_id = model.config.mask_token_id
    ids = context + continuation
    total, greedy = 0.0, True
    for i in range(len(context), len(ids)):
        logits = model(torch.tensor([ids[:i] + [mask_id]])).logits[0, -1].float()
        logits[mask_id] = float("-inf")
        total += float(torch.log_softmax(logits, -1)[ids[i]])
        greedy &= int(logits.argmax()) == ids[i]
    return total, greedy


def test_loglikelihood_is_the_exact_conditional_at_block_size_one():
    model, tokenizer = _tiny(1, always_mask=True), load_tokenizer()
    harness = BD3LMEvalHarness(model, tokenizer, batch_size=3)
    assert harness.mc_samples == 1  # exact: no Monte-Carlo needed
    pairs = [("In the beginning", " God created"), ("To be, or not to ", "be"), ("", "Hello")]
    results = harness.loglikelihood(_requests("loglikelihood", pairs))
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = [
        _ar_logprob(model, enc("In the beginning"), enc(" God created")),
        _ar_logprob(model, enc("To be, or not to"), enc(" be")),  # the trailing space moves to the continuation
        _ar_logprob(model, [tokenizer.bos_token_id], enc("Hello")),  # empty context: conditioned on BOS
    ]
    for (value, greedy), (ref, ref_greedy) in zip(results, expected):
        assert value == pytest.approx(ref, abs=1e-4)
        assert greedy == ref_greedy
    [rolling] = harness.loglikelihood_rolling(_requests("loglikelihood_rolling", [("In the beginning God",)]))
    reference, _ = _ar_logprob(model, [tokenizer.bos_token_id], enc("In the beginning God"))
    assert rolling == pytest.approx(reference, abs=1e-4)


def test_monte_carlo_scores_do_not_depend_on_batch_size_or_order():
    model, tokenizer = _tiny(4), load_tokenizer()
    pairs = [(q["question"], c) for q in QUESTIONS[:2] for c in q["choices"]]
    options = {"mc_samples": 2, "check_greedy": False, "exact": False}
    a = BD3LMEvalHarness(model, tokenizer, batch_size=1, **options).loglikelihood(_requests("loglikelihood", pairs))
    b = BD3LMEvalHarness(model, tokenizer, batch_size=16, **options).loglikelihood(
        _requests("loglikelihood", pairs[::-1])
    )[::-1]
    assert [v for v, _ in a] == pytest.approx([v for v, _ in b], abs=1e-4)
    assert all(v <= 0 for v, _ in a)  # a draw that masks no continuation token scores 0


def test_small_blocks_default_to_the_exact_expectation_over_the_noise():
    model, tokenizer = _tiny(4), load_tokenizer()
    harness = BD3LMEvalHarness(model, tokenizer, check_greedy=False)
    assert harness.exact
    pairs = [("In the beginning", " God created the heaven")]
    [(value, _)] = harness.loglikelihood(_requests("loglikelihood", pairs))
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    [(reference, _)] = score_continuations(
        model, [(enc("In the beginning"), enc(" God created the heaven"))], exact=True
    )
    assert value == pytest.approx(-reference, abs=1e-5) and value < 0
    assert harness.loglikelihood(_requests("loglikelihood", pairs))[0][0] == value  # deterministic


def test_bad_arguments():
    model, tokenizer = _tiny(4), load_tokenizer()
    with pytest.raises(ValueError, match="mc_samples"):
        BD3LMEvalHarness(model, tokenizer, mc_samples=0)
    with pytest.raises(ValueError, match="tokenizer"):
        BD3LMEvalHarness(model)


def _write_tasks(tmp_path) -> str:
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    (tmp_path / "gen.jsonl").write_text(json.dumps({"prompt": "In the beginning", "answer": " God"}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = "dataset_path: json\ntest_split: test\n"
    (tasks / "tiny_mc.yaml").write_text(
        f"task: bd3lm_tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    (tasks / "tiny_rolling.yaml").write_text(
        f"task: bd3lm_tiny_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n"
    )
    (tasks / "tiny_gen.yaml").write_text(
        f"task: bd3lm_tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return str(tasks)


def _accuracy(model, tokenizer) -> float:
    """The harness' accuracy on QUESTIONS: our argmax over the choices' log-likelihoods."""
    harness = BD3LMEvalHarness(model, tokenizer)
    scores = harness.loglikelihood(
        _requests("loglikelihood", [(q["question"], c) for q in QUESTIONS for c in q["choices"]])
    )
    acc, k = 0, 0
    for q in QUESTIONS:
        values = [v for v, _ in scores[k : k + len(q["choices"])]]
        acc += int(max(range(len(values)), key=values.__getitem__) == q["answer"])
        k += len(q["choices"])
    return acc / len(QUESTIONS)


def test_readme_command_falls_back_to_the_cpu_without_cuda(tmp_path):
    """The shell command of docs/evaluation.md as a new user types it, on a machine without CUDA (hidden here, so the
    test means the same on a GPU machine): lm-eval passes `device="cuda:0"` by default; the adapter says so in one
    warning line, evaluates on the CPU and scores as in process."""
    model, tokenizer = _tiny(1, always_mask=True), load_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    include = _write_tasks(tmp_path)
    command = [
        sys.executable,
        "-m",
        "bd3lm_trainer.evaluation.lm_eval_adapter",
        "run",
        "--model",
        "bd3lm",
        "--model_args",
        f"pretrained={tmp_path / 'model'}",
        "--tasks",
        "bd3lm_tiny_mc",  # the docs', then:
        "--include_path",
        include,
        "--output_path",
        str(tmp_path / "results"),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if "not available" in line] == [
        "bd3lm: device 'cuda:0' is not available on this machine (torch.cuda.is_available() is False); evaluating on "
        "the CPU instead (pass --device cpu to choose it)."
    ]
    [path] = (tmp_path / "results").rglob("results_*.json")
    assert json.loads(path.read_text())["results"]["bd3lm_tiny_mc"]["acc,none"] == pytest.approx(
        _accuracy(model, tokenizer)
    )


def test_simple_evaluate_runs_offline_on_tiny_local_tasks(tmp_path):
    model, tokenizer = _tiny(1, always_mask=True), load_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    include = _write_tasks(tmp_path)
    out = lm_eval.simple_evaluate(
        model="bd3lm",
        model_args=f"pretrained={tmp_path / 'model'},device=cpu,batch_size=4",
        tasks=["bd3lm_tiny_mc", "bd3lm_tiny_rolling"],
        task_manager=TaskManager(include_path=include, include_defaults=False),
    )
    results = out["results"]
    assert results["bd3lm_tiny_mc"]["acc,none"] == pytest.approx(_accuracy(model, tokenizer))
    harness = BD3LMEvalHarness(model, tokenizer)
    # word perplexity = exp(-Σ loglikelihood / Σ words)
    rolling = harness.loglikelihood_rolling(_requests("loglikelihood_rolling", [(d["text"],) for d in DOCUMENTS]))
    words = sum(len(d["text"].split()) for d in DOCUMENTS)
    expected = math.exp(-sum(rolling) / words)
    assert results["bd3lm_tiny_rolling"]["word_perplexity,none"] == pytest.approx(expected, rel=1e-4)


def test_generate_until_uses_generate_and_stops_at_the_stop_strings(tmp_path):
    model, tokenizer = _tiny(4), load_tokenizer()
    harness = BD3LMEvalHarness(model, tokenizer, batch_size=2)
    requests = _requests(
        "generate_until",
        [
            ("In the beginning", {"until": ["e"], "max_gen_toks": 4, "do_sample": False}),
            ("To be", {"until": ["e"], "max_gen_toks": 4, "do_sample": False}),
        ],
    )
    try:
        texts = harness.generate_until(requests)
    except NotImplementedError:
        pytest.skip("generate() has not landed yet")
    for (context, _), text in zip([r.args for r in requests], texts):
        assert "e" not in text
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        full = tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
        assert full.split("e")[0] == text  # the same greedy generation, cut at the stop string
    include = _write_tasks(tmp_path)
    results = lm_eval.simple_evaluate(
        model=harness, tasks=["bd3lm_tiny_gen"], task_manager=TaskManager(include_path=include, include_defaults=False)
    )["results"]
    assert results["bd3lm_tiny_gen"]["exact_match,none"] in (0.0, 1.0)


def test_sampled_generate_until_depends_neither_on_batch_size_nor_on_order():
    """Sampling tasks: each request draws from its own seed (the harness seed, its prompt, and which repeat of that
    prompt it is), so its text is the same whatever batch it lands in, and repeats of one prompt differ."""
    model, tokenizer = _tiny(4), load_tokenizer()
    gen = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": True}
    contexts = ["In the beginning", "To be", "And God said", "To be"]
    requests = _requests("generate_until", [(c, gen) for c in contexts])
    one = BD3LMEvalHarness(model, tokenizer, batch_size=1, progress=False).generate_until(requests)
    three = BD3LMEvalHarness(model, tokenizer, batch_size=3, progress=False).generate_until(requests[::-1])[::-1]
    assert (one[0], one[2]) == (three[0], three[2])
    assert sorted([one[1], one[3]]) == sorted([three[1], three[3]])  # reversed, the repeats swap places
    assert one[1] != one[3]  # two repeats of "To be" are two samples


def test_a_monte_carlo_score_is_the_nelbo_under_the_requests_own_seed():
    """One score recomputed by hand: the request's window built as documented (context left-padded to whole blocks,
    the target after it) and its noise drawn from the generator seeded with
    (crc32 of the int64 bytes of [len(context), *context, *target]) + 1_000_003 · seed, modulo 2^63."""
    import struct
    import zlib

    from bd3lm_trainer.evaluation import nelbo

    model, tokenizer = _tiny(4), load_tokenizer()
    options = {"batch_size": 1, "mc_samples": 3, "exact": False, "check_greedy": False}
    pairs = [("In the beginning", " God created the heaven"), ("To be, or not to", " be")]
    [(value, _), _] = BD3LMEvalHarness(model, tokenizer, seed=77, **options).loglikelihood(
        _requests("loglikelihood", pairs)
    )
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    context, target = enc("In the beginning"), enc(" God created the heaven")
    begin = -(-len(context) // 4) * 4
    end = begin + len(target)
    ids = torch.full((1, -(-end // 4) * 4), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    ids[0, begin - len(context) : end] = torch.tensor(context + target)
    mask[0, begin - len(context) : end] = 1
    labels[0, begin:end] = torch.tensor(target)
    words = [len(context), *context, *target]
    row_seed = (zlib.crc32(struct.pack(f"={len(words)}q", *words)) + 1_000_003 * 77) % 2**63
    out = nelbo(model, ids, mask, labels, 3, [torch.Generator().manual_seed(row_seed)])
    assert value == -float(out.per_sequence[0])
    [(other, _), _] = BD3LMEvalHarness(model, tokenizer, seed=78, **options).loglikelihood(
        _requests("loglikelihood", pairs)
    )
    assert other != value  # the seed is used


def test_a_loaded_model_falls_back_to_the_cpu_without_cuda(monkeypatch, caplog):
    """lm-eval passes `device="cuda:0"` by default, also with a model object: without CUDA (hidden here, so that the
    test means the same on a GPU machine) the harness warns once and evaluates on the CPU, as with a path."""
    import logging

    model, tokenizer = _tiny(1, always_mask=True), load_tokenizer()
    pairs = [("In the beginning", " God created")]
    expected = BD3LMEvalHarness(model, tokenizer, device="cpu").loglikelihood(_requests("loglikelihood", pairs))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        harness = BD3LMEvalHarness(model, tokenizer, device="cuda:0")
    assert [r.getMessage() for r in caplog.records if "not available" in r.getMessage()] == [
        "bd3lm: device 'cuda:0' is not available on this machine (torch.cuda.is_available() is False); evaluating on "
        "the CPU instead (pass --device cpu to choose it)."
    ]
    assert harness.model is model and harness.model.device.type == "cpu" and harness._device.type == "cpu"
    assert harness.loglikelihood(_requests("loglikelihood", pairs)) == expected
