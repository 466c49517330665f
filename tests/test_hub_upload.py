"""hub_upload: the plan is exactly the allow-list, the real huggingface_hub client uploads it to a fake Hub on loopback,
the card parses back, the token never leaks, and what arrives loads in a fresh process without this project."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

import hub_upload
from modeling_bd3lm import BD3LMForMaskedDiffusion
from tests import fake_hub
from tests.conftest import (
    OFFICIAL_FIXTURE,
    REPO_ROOT,
    random_model,
    run_python_without_project,
)

FAKE_TOKEN = "hf_FakeTokenForTests_0123456789abcdefXYZ"
EVAL_PPL = 57.25


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: the fake Hub, the environment that points at it, folders to publish


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The fake Hub as a subprocess on 127.0.0.1; stopped by its process id."""
    root = tmp_path_factory.mktemp("fake-hub")
    port_file = root / "port"
    env = dict(os.environ, FAKE_HUB_TOKEN=FAKE_TOKEN)
    log = open(root / "server.log", "wb")  # a file, not a pipe: a full pipe would block the server
    process = subprocess.Popen(
        [sys.executable, str(Path(fake_hub.__file__)), "--root", str(root / "store"), "--port-file", str(port_file)],
        env=env,
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the fake Hub did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.02)
    yield type(
        "Hub", (), {"endpoint": f"http://127.0.0.1:{port_file.read_text()}", "root": root / "store", "pid": process.pid}
    )
    os.kill(process.pid, signal.SIGTERM)
    process.wait(timeout=10)
    log.close()


def _point_at(mp: pytest.MonkeyPatch, hub, tmp: Path, token: str | None = FAKE_TOKEN) -> None:
    mp.setenv("HF_ENDPOINT", hub.endpoint)
    mp.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)  # stray library requests stay on loopback too
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; loopback is allowed
    mp.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp / "no-token-file"))  # no login cache either
    mp.delenv("HF_OIDC_RESOURCE", raising=False)
    mp.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token is None:
        mp.delenv("HF_TOKEN", raising=False)
    else:
        mp.setenv("HF_TOKEN", token)


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path):
    _point_at(monkeypatch, hub, tmp_path)
    return hub


def make_tokenizer(folder: Path) -> None:
    """A 64-id word-level tokenizer matching the tiny model: <|endoftext|> = 0, <|pad|> = 1, <|mask|> = 63."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, **{f"w{i}": i for i in range(2, 63)}, "<|mask|>": 63}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        mask_token="<|mask|>",
    ).save_pretrained(folder)


def make_trainer_output(folder: Path, seed: int = 0) -> BD3LMForMaskedDiffusion:
    """A folder laid out like a BD3LMTrainer output: the final model on top, a checkpoint below, and the leftovers
    that must stay behind (optimizer/scheduler/RNG states, training_args.bin, a .env holding the token, stray files)."""
    model = random_model(seed=seed)
    model.set_noise_interval(0.45, 0.95)
    model.save_pretrained(folder)
    make_tokenizer(folder)
    (folder / "eval_results.json").write_text(json.dumps({"eval_loss": 4.05, "eval_ppl": EVAL_PPL}))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 20, "epoch": 2.0, "train_batch_size": 4}))
    (folder / "schedule_search.json").write_text(
        json.dumps(
            {
                "step": 20,
                "num_batches": 3,
                "best": [0.45, 0.95],
                "applied": True,
                "table": [
                    {"eps_min": 0.45, "eps_max": 0.95, "nelbo_var": 1.0},
                    {"eps_min": 0.001, "eps_max": 1.0, "nelbo_var": 2.0},
                ],
            }
        )
    )
    (folder / "training_args.json").write_text(json.dumps({"learning_rate": 3e-4, "seed": 7}))
    (folder / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (folder / ".env").write_text(f"HF_TOKEN={FAKE_TOKEN}\n")
    (folder / "notes.txt").write_text("scratch\n")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out").write_bytes(b"tb")
    checkpoint = folder / "checkpoint-10"
    random_model(seed=seed + 1).save_pretrained(checkpoint)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (checkpoint / name).write_bytes(b"state")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    return model


@pytest.fixture
def trainer_output(tmp_path) -> tuple[Path, BD3LMForMaskedDiffusion]:
    folder = tmp_path / "out"
    return folder, make_trainer_output(folder)


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def saved_file_names(model) -> set[str]:
    """What `save_pretrained` itself writes for this model: the reference for 'the code files and weights'."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return set(os.listdir(folder))


# ----------------------------------------------------------------------------------------------------------------------
# The plan


def test_plan_is_exactly_the_allow_list_and_says_what_stayed_behind(trainer_output):
    folder, model = trainer_output
    with hub_upload.plan_upload(folder, "fake-user/tiny", datasets=["fake-user/corpus"], nfe_tokens=0) as plan:
        tokenizer_files = {p.name for p in folder.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))}
        assert tokenizer_files  # the fixture wrote some
        expected = saved_file_names(model) | tokenizer_files | {"README.md"}
        assert {f.path for f in plan.files} == expected == set(files_under(plan.staging))
        assert {f.path: f.size for f in plan.files} == {k: len(v) for k, v in files_under(plan.staging).items()}
        left = {item.path: item.reason for item in plan.left_out}
        assert set(left) == {
            ".env",
            "training_args.bin",
            "notes.txt",
            "runs/",
            "checkpoint-10/",
            "eval_results.json",
            "trainer_state.json",
            "schedule_search.json",
            "training_args.json",
        }
        assert "secrets" in left[".env"] and "pickle" in left["training_args.bin"]
        assert "--checkpoint checkpoint-10" in left["checkpoint-10/"]
        config = json.loads((plan.staging / "config.json").read_text())
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM", "AutoModelForCausalLM"}
        staging = plan.staging
        # The staged model is the trained one, searched interval included.
        reloaded = BD3LMForMaskedDiffusion.from_pretrained(staging)
        assert reloaded.training_noise_interval() == pytest.approx((0.45, 0.95))
        for key, value in model.state_dict().items():
            torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
    assert not staging.exists()  # the context manager removes the staging folder


def test_checkpoint_option_publishes_that_checkpoint(trainer_output):
    folder, _ = trainer_output
    with hub_upload.plan_upload(folder, "fake-user/tiny", checkpoint="checkpoint-10", nfe_tokens=0) as plan:
        staged = load_file(plan.staging / "model.safetensors")
        checkpoint = load_file(folder / "checkpoint-10" / "model.safetensors")
        assert staged.keys() == checkpoint.keys() and all(torch.equal(staged[k], checkpoint[k]) for k in staged)
        left = {item.path: item.reason for item in plan.left_out}
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
            assert f"checkpoint-10/{name}" in left
        assert "publishing checkpoint-10 instead" in left["model.safetensors"]
        assert "tokenizer.json" in {f.path for f in plan.files}  # the checkpoint has none: the top-level one travels
        assert plan.card_info.training["steps"] == 10  # the checkpoint's own trainer_state wins
    with pytest.raises(ValueError, match="checkpoint='checkpoint-99'.*checkpoint-10"):
        hub_upload.plan_upload(folder, "fake-user/tiny", checkpoint="checkpoint-99")


def test_sharded_weights_round_trip(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path / "model")
    with hub_upload.plan_upload(tmp_path / "model", "fake-user/tiny", max_shard_size="100KB", nfe_tokens=0) as plan:
        names = {f.path for f in plan.files}
        shards = {n for n in names if n.startswith("model-")}
        assert len(shards) > 1 and "model.safetensors.index.json" in names and "model.safetensors" not in names
        # Sharded input plans too.
        with hub_upload.plan_upload(plan.staging, "fake-user/tiny", nfe_tokens=0) as again:
            assert {f.path for f in again.files} == {"README.md", "model.safetensors"} | (
                names - shards - {"README.md", "model.safetensors.index.json"}
            )


def test_card_metadata_and_body(trainer_output):
    folder, _ = trainer_output
    with hub_upload.plan_upload(
        folder,
        "fake-user/tiny",
        datasets=["fake-user/corpus"],
        license="apache-2.0",
        base_model="fake-user/tiny-base",
        nfe_tokens=8,
    ) as plan:
        card = ModelCard.load(plan.staging / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"block-diffusion", "bd3lm", "diffusion-language-model"} <= set(data.tags)
    assert data.license == "apache-2.0" and data.datasets == ["fake-user/corpus"]
    assert data.base_model == "fake-user/tiny-base"
    (result,) = data.eval_results
    assert result.metric_type == "perplexity" and result.metric_value == pytest.approx(EVAL_PPL)
    assert result.dataset_type == "fake-user/corpus"
    assert data.to_dict() == plan.card.data.to_dict()  # round trip through the file
    text = card.text
    for needle in (
        "trust_remote_code=True",
        "revision=revision",
        "model.generate(",
        "Block size L' | 4",
        "[0.45, 0.95]",
        "at step 20 over 2 candidate intervals, 3 validation batches each",
        "Network calls per token",
        "Limitations",
        "@inproceedings{arriola2025block",
        "steps: 20",
        "learning rate: 0.0003",
        "AutoTokenizer.from_pretrained(repo",
        'pipeline("text-generation"',
    ):
        assert needle in text, needle
    calls = plan.card_info.network_calls
    if calls is not None:  # generate() exists in this build: the card states the measured figure and how
        assert calls["tokens"] == 8 and calls["calls"] >= 8
        assert f"{calls['calls_per_token']:.3f} network calls per generated token" in text
        assert "generate()'s count of network calls" in text


def _section(text: str, heading: str) -> str:
    return text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]


def test_card_states_the_recorded_training_data(trainer_output):
    """`training_data.json` (as `bd3lm train` writes it) becomes the card's data lines: name, licence, tokens."""
    folder, _ = trainer_output
    corpus = {"name": "bd3lm-corpus", "description": "King James Bible + Shakespeare", "license": "public domain"}
    (folder / "training_data.json").write_text(
        json.dumps(
            {
                "train": {**corpus, "split": "train", "chunks": 62117, "tokens": 1987744},
                "evaluation": {
                    "name": "valid.jsonl",
                    "description": "a local file",
                    "license": None,
                    "chunks": 4,
                    "tokens": 128,
                },
            }
        )
    )
    with hub_upload.plan_upload(folder, "fake-user/tiny", nfe_tokens=0) as plan:
        text = plan.card.text
        assert "training_data.json" not in {f.path for f in plan.files}  # read into the card, not published
    assert _section(text, "Training").split("\n- steps")[0].strip().splitlines() == [
        "- Training data: `bd3lm-corpus`, train split (King James Bible + Shakespeare); licence: public domain; "
        "1,987,744 tokens of this model's tokenizer.",
        "- Validation data: `valid.jsonl` (a local file); licence: not recorded; 128 tokens of this model's tokenizer.",
    ]


def test_card_lists_only_sampler_settings_that_differ_from_the_defaults(tmp_path):
    model = random_model()
    model.generation_config.update(bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model.save_pretrained(tmp_path / "plain")
    with hub_upload.plan_upload(tmp_path / "plain", "fake-user/tiny", nfe_tokens=0) as plan:
        table = _section(plan.card.text, "Sampler defaults (`generation_config.json`)").strip().splitlines()
    assert table == [
        "| setting | value |",
        "|---|---|",
        "| `sampler` | `first_hitting` (none stored: the built-in default) |",
        "| `bos_token_id` | `0` |",
        "| `eos_token_id` | `0` |",
        "| `pad_token_id` | `1` |",
        "",
        "Every other setting is the built-in default of `BD3LMGenerationConfig`.",
    ]
    model.generation_config.update(confidence_threshold=0.8, nucleus_p=0.9)
    model.save_pretrained(tmp_path / "threshold")
    with hub_upload.plan_upload(tmp_path / "threshold", "fake-user/tiny", nfe_tokens=0) as plan:
        table = _section(plan.card.text, "Sampler defaults (`generation_config.json`)").strip().splitlines()
    assert table[2:6] == [
        "| `sampler` | `confidence_threshold` (none stored: chosen because `confidence_threshold` is set) |",
        "| `bos_token_id` | `0` |",
        "| `confidence_threshold` | `0.8` |",
        "| `eos_token_id` | `0` |",
    ]
    assert table[6:8] == ["| `nucleus_p` | `0.9` |", "| `pad_token_id` | `1` |"]
    model.generation_config.update(confidence_threshold=None, sampler="ddpm", num_steps=8)
    model.save_pretrained(tmp_path / "ddpm")
    with hub_upload.plan_upload(tmp_path / "ddpm", "fake-user/tiny", nfe_tokens=0) as plan:
        table = _section(plan.card.text, "Sampler defaults (`generation_config.json`)").strip().splitlines()
    assert table[2:4] == ["| `sampler` | `ddpm` |", "| `bos_token_id` | `0` |"] and "| `num_steps` | `8` |" in table


# ----------------------------------------------------------------------------------------------------------------------
# Uploading to the fake Hub


def test_dry_run_prints_the_plan_and_sends_nothing(trainer_output, hub_env, capfd):
    folder, _ = trainer_output
    before = len(fake_hub.requests_log(hub_env.root))
    assert hub_upload.main([str(folder), "fake-user/dry", "--dry-run", "--nfe-tokens", "0"]) == 0
    out, err = capfd.readouterr()
    assert len(fake_hub.requests_log(hub_env.root)) == before
    assert fake_hub.read_repo(hub_env.root, "fake-user/dry") is None
    for needle in (
        "model.safetensors",
        "config.json",
        "modeling_bd3lm.py",
        "tokenizer.json",
        "Left out",
        ".env",
        "training_args.bin",
        "checkpoint-10/",
        "README.md (model card)",
        "library_name: transformers",
        "nothing was sent",
    ):
        assert needle in out, needle
    assert FAKE_TOKEN not in out + err


def test_dry_run_lists_the_trainer_reports_as_read_into_the_card_not_as_left_out(trainer_output, capsys):
    """`training_data.json` and the other reports are stated by the card: the dry run says so on a line of their own,
    and "Left out" (the files one might `--include`) does not offer them."""
    folder, _ = trainer_output
    (folder / "training_data.json").write_text(json.dumps({"train": {"name": "bd3lm-corpus", "tokens": 128}}))
    assert hub_upload.main([str(folder), "fake-user/dry", "--dry-run", "--nfe-tokens", "0"]) == 0
    plan_text = capsys.readouterr().out.split("README.md (model card):")[0]
    left_out = plan_text.split("Left out")[1].split("Read into the model card")[0]
    read = [line for line in plan_text.splitlines() if line.startswith("Read into the model card, not published")]
    assert "training_data.json" not in left_out and "notes.txt" in left_out
    assert read == [
        "Read into the model card, not published (5): eval_results.json, schedule_search.json, "
        "trainer_state.json, training_args.json, training_data.json"
    ]


def test_upload_arrives_exactly_as_planned(trainer_output, hub_env, capfd):
    folder, _ = trainer_output
    with hub_upload.plan_upload(folder, "fake-user/tiny-bd3lm", datasets=["fake-user/corpus"], nfe_tokens=0) as plan:
        planned = files_under(plan.staging)
        result = hub_upload.upload(plan, "fake-user/tiny-bd3lm", private=True, commit_message="first release")
        card = plan.card
    arrived = fake_hub.tree(hub_env.root, "fake-user/tiny-bd3lm", result.commit_oid)
    assert files_under(arrived) == planned
    assert result.revision == "main" and result.pr_url is None
    meta = fake_hub.read_repo(hub_env.root, "fake-user/tiny-bd3lm")
    assert meta["private"] and meta["refs"]["main"] == result.commit_oid
    assert meta["commits"][-1]["message"] == "first release"
    assert ModelCard.load(arrived / "README.md").data.to_dict() == card.data.to_dict()
    out, err = capfd.readouterr()
    assert FAKE_TOKEN not in out + err
    assert all(FAKE_TOKEN.encode() not in content for content in files_under(hub_env.root).values())
    writes = [r for r in fake_hub.requests_log(hub_env.root) if r["method"] == "POST"]
    assert writes and all(r["authorized"] for r in writes)  # the token was sent, as a header only


def test_branch_and_pull_request(trainer_output, hub_env):
    folder, _ = trainer_output
    repo_id = "fake-user/tiny-pr"
    with hub_upload.plan_upload(folder, repo_id, nfe_tokens=0) as plan:
        planned = files_under(plan.staging)
        proposed = hub_upload.upload(plan, repo_id, revision="dev", create_pr=True, commit_message="propose")
        meta = fake_hub.read_repo(hub_env.root, repo_id)
        assert proposed.pr_url.endswith("/discussions/1") and meta["refs"]["refs/pr/1"] == proposed.commit_oid
        assert meta["refs"]["dev"] == meta["refs"]["main"]  # opening the PR moved no branch
        assert files_under(fake_hub.tree(hub_env.root, repo_id, "refs/pr/1")) == planned
        pushed = hub_upload.upload(plan, repo_id, revision="dev")
    meta = fake_hub.read_repo(hub_env.root, repo_id)
    assert pushed.pr_url is None and meta["refs"]["dev"] == pushed.commit_oid != meta["refs"]["main"]
    assert files_under(fake_hub.tree(hub_env.root, repo_id, "dev")) == planned
    assert files_under(fake_hub.tree(hub_env.root, repo_id, "main")) == {}


# The child loads each repository twice: from the folder that arrived, and by id through the fake Hub at a pinned
# revision; then it generates. Results go to JSON / safetensors files for the parent to check.
CHILD = r"""
import json, os, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM
jobs = json.loads(os.environ["JOBS"])
inputs = load_file(os.environ["INPUTS"])
report, logits = {}, {}
for name, job in jobs.items():
    for how, kwargs in (("folder", {"pretrained_model_name_or_path": job["folder"]}),
                        ("hub", {"pretrained_model_name_or_path": job["repo_id"], "revision": job["revision"]})):
        model = AutoModelForMaskedLM.from_pretrained(trust_remote_code=True, **kwargs).eval()
        assert type(model).__name__ == "BD3LMForMaskedDiffusion", type(model)
        with torch.no_grad():
            logits[f"{name}.{how}"] = model(inputs["x_t"], return_dict=True).logits
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(inputs["prompt"], max_new_tokens=8)
        out = getattr(out, "sequences", out)
        report[name] = {"generate": "ok", "shape": list(out.shape), "ids": out.tolist()}
    except NotImplementedError as error:
        report[name] = {"generate": "not implemented", "error": str(error)}
# the card's pipeline_tag: the Hub repository (at its revision) runs in a text-generation pipeline
from transformers import pipeline
job = jobs["trained"]
pipe = pipeline("text-generation", model=job["repo_id"], revision=job["revision"], trust_remote_code=True)
report["trained"]["pipeline"] = pipe(
    "w5 w9 w17", max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
save_file(logits, "child_logits.safetensors")
json.dump(report, open("child_report.json", "w"))
"""


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory):
    """Upload a trained folder and the official fixture, then load both in one fresh process without this project."""
    tmp = tmp_path_factory.mktemp("published")
    model = make_trainer_output(tmp / "out", seed=3)
    official = BD3LMForMaskedDiffusion.from_pretrained(OFFICIAL_FIXTURE).eval()
    # The trained folder goes through the command line, in a process of its own, as a user would run it.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    path = os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))  # this checkout first
    env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN=FAKE_TOKEN, HF_HOME=str(tmp / "hf-home"), PYTHONPATH=path)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "hub_upload",
            str(tmp / "out"),
            "fake-user/trained-bd3lm",
            "--dataset",
            "fake-user/corpus",
            "--license",
            "apache-2.0",
            "--commit-message",
            "first release",
            "--nfe-tokens",
            "0",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    jobs, plans = {}, {}
    oid = fake_hub.read_repo(hub.root, "fake-user/trained-bd3lm")["refs"]["main"]
    jobs["trained"] = {
        "folder": str(fake_hub.tree(hub.root, "fake-user/trained-bd3lm", oid)),
        "repo_id": "fake-user/trained-bd3lm",
        "revision": oid,
    }
    with pytest.MonkeyPatch.context() as mp:
        _point_at(mp, hub, tmp)
        with hub_upload.plan_upload(OFFICIAL_FIXTURE, "fake-user/official-bd3lm", nfe_tokens=0) as plan:
            result = hub_upload.upload(plan, "fake-user/official-bd3lm")
            plans["official"] = plan
        arrived = fake_hub.tree(hub.root, "fake-user/official-bd3lm", result.commit_oid)
        jobs["official"] = {
            "folder": str(arrived),
            "repo_id": "fake-user/official-bd3lm",
            "revision": result.commit_oid,
        }
    g = torch.Generator().manual_seed(0)
    x_t = torch.randint(0, 63, (2, 32), generator=g)
    x_t[:, 8:] = 63
    save_file({"x_t": x_t, "prompt": x_t[:1, :4].clone()}, tmp / "inputs.safetensors")
    child = run_python_without_project(
        CHILD,
        cwd=tmp,
        env={
            "JOBS": json.dumps(jobs),
            "INPUTS": str(tmp / "inputs.safetensors"),
            "HF_HUB_OFFLINE": None,
            "HF_ENDPOINT": hub.endpoint,
            "HF_TOKEN": None,
            "HF_HOME": str(tmp / "hf-home"),
        },
    )
    assert child.returncode == 0, child.stderr[-4000:]
    with torch.no_grad():
        expected = {"trained": model(x_t, return_dict=True).logits, "official": official(x_t, return_dict=True).logits}
    return {
        "jobs": jobs,
        "plans": plans,
        "expected": expected,
        "cli": cli,
        "logits": load_file(tmp / "child_logits.safetensors"),
        "report": json.loads((tmp / "child_report.json").read_text()),
    }


def test_command_line_upload_output_lists_what_arrived_and_never_the_token(published):
    cli = published["cli"]
    assert FAKE_TOKEN not in cli.stdout + cli.stderr
    arrived = Path(published["jobs"]["trained"]["folder"])
    listed = {line.split()[0] for line in cli.stdout.splitlines()[1:] if line.startswith("  ") and "(" not in line}
    assert set(files_under(arrived)) == listed
    assert f"Uploaded {len(listed)} files to fake-user/trained-bd3lm@main" in cli.stdout
    assert "commit/" + published["jobs"]["trained"]["revision"] in cli.stdout
    assert all(FAKE_TOKEN.encode() not in content for content in files_under(arrived).values())


def test_uploaded_repository_loads_in_a_fresh_process_without_this_project(published):
    for name in ("trained", "official"):
        for how in ("folder", "hub"):
            torch.testing.assert_close(
                published["logits"][f"{name}.{how}"], published["expected"][name], rtol=0, atol=1e-5
            )


def test_official_checkpoint_converts_into_a_repository_with_our_code_and_card(published):
    plan = published["plans"]["official"]
    arrived = Path(published["jobs"]["official"]["folder"])
    config = json.loads((arrived / "config.json").read_text())
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_bd3lm.BD3LMForMaskedDiffusion"
    assert config["architectures"] == ["BD3LMForMaskedDiffusion"]
    assert (arrived / "generation_config.json").exists() and (arrived / "modeling_bd3lm.py").exists()
    assert plan.card_info.converted_from_official
    card = ModelCard.load(arrived / "README.md")
    assert "official BD3-LM release" in card.text and "bd3lm" in card.data.tags
    assert {item.path for item in plan.left_out} == {"README.md", "cases.safetensors", "meta.json"}


def test_uploaded_repository_generates_in_a_fresh_process(published):
    for name, report in published["report"].items():
        if report["generate"] == "not implemented":
            pytest.xfail(f"generate() is not implemented in this build yet: {report['error']}")
        assert report["shape"] == [1, 12], name
        new = torch.tensor(report["ids"])[0, 4:]
        assert ((new >= 0) & (new < 63)).all(), f"{name}: generated the mask id or out-of-range ids: {new}"


def test_uploaded_repository_runs_in_a_text_generation_pipeline(published):
    from transformers import AutoTokenizer

    arrived = Path(published["jobs"]["trained"]["folder"])
    model = BD3LMForMaskedDiffusion.from_pretrained(arrived).eval()
    tokenizer = AutoTokenizer.from_pretrained(arrived)
    ids = tokenizer("w5 w9 w17", return_tensors="pt", add_special_tokens=False).input_ids
    new = model.generate(ids, max_new_tokens=8)[0, ids.shape[1] :]
    assert published["report"]["trained"]["pipeline"] == tokenizer.decode(new, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA adapters


def test_lora_adapter_publishes_with_a_card_naming_the_base_model(tmp_path, hub_env):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = random_model(seed=5)
    peft_model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["attn_qkv", "attn_out"], init_lora_weights=False)
    ).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "optimizer.pt").write_bytes(b"state")
    with pytest.raises(ValueError, match="--base-model"):  # saved from an in-memory base: no Hub id to name
        hub_upload.plan_upload(tmp_path / "adapter", "fake-user/tiny-lora")
    wrong = tmp_path / "wrong-rank"
    peft_model.save_pretrained(wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ValueError, match="do not match adapter_config.json.*r=3"):
        hub_upload.plan_upload(wrong, "fake-user/tiny-lora", base_model="fake-user/tiny-bd3lm")
    with hub_upload.plan_upload(tmp_path / "adapter", "fake-user/tiny-lora", base_model="fake-user/tiny-bd3lm") as plan:
        assert plan.kind == "adapter"
        assert {f.path for f in plan.files} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
        assert {item.path for item in plan.left_out} == {"optimizer.pt", "README.md"}  # PEFT's README: replaced
        planned = files_under(plan.staging)
        result = hub_upload.upload(plan, "fake-user/tiny-lora")
    arrived = fake_hub.tree(hub_env.root, "fake-user/tiny-lora", result.commit_oid)
    assert files_under(arrived) == planned
    card = ModelCard.load(arrived / "README.md")
    assert card.data.base_model == "fake-user/tiny-bd3lm" and card.data.library_name == "peft"
    assert {"lora", "bd3lm"} <= set(card.data.tags) and "PeftModel.from_pretrained" in card.text
    assert (
        json.loads((arrived / "adapter_config.json").read_text())["base_model_name_or_path"] == "fake-user/tiny-bd3lm"
    )
    x = torch.randint(0, 63, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
        reloaded = PeftModel.from_pretrained(random_model(seed=5), arrived).eval()
        torch.testing.assert_close(reloaded(input_ids=x).logits, expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing sent


def _half_written(tmp: Path, case: str) -> Path:
    folder = tmp / case
    random_model().save_pretrained(folder)
    if case == "no-weights":
        (folder / "model.safetensors").unlink()
    elif case == "truncated-weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "missing-shard":
        random_model().save_pretrained(folder, max_shard_size="100KB")
        (folder / "model.safetensors").unlink()
        next(folder.glob("model-00002-*.safetensors")).unlink()
    elif case == "no-config":
        (folder / "config.json").unlink()
    elif case == "broken-config":
        (folder / "config.json").write_text('{"block_size": 4, ')
    elif case in ("more-layers", "wider"):
        config = json.loads((folder / "config.json").read_text())
        config.update(n_blocks=3) if case == "more-layers" else config.update(hidden_dim=128)
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "pickle-weights":
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("no-weights", "no file named model.safetensors"),
        ("truncated-weights", "truncated or corrupted"),
        ("missing-shard", "No such file.*model-00002"),
        ("no-config", "neither config.json"),
        ("broken-config", "not a valid JSON"),
        ("more-layers", "do not match its config.*missing"),
        ("wider", "do not match its config.*wrong shape"),
        ("pickle-weights", "pickle"),
    ],
)
def test_bad_folders_fail_clearly_and_send_nothing(case, message, tmp_path, hub_env, capsys):
    folder = tmp_path / "missing" if case == "missing" else _half_written(tmp_path, case)
    before = len(fake_hub.requests_log(hub_env.root))
    with pytest.raises(ValueError, match=message):
        hub_upload.plan_upload(folder, "fake-user/bad", nfe_tokens=0)
    assert hub_upload.main([str(folder), "fake-user/bad", "--nfe-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err and FAKE_TOKEN not in err
    assert len(fake_hub.requests_log(hub_env.root)) == before


@pytest.mark.parametrize("repo_id", ["has space/name", "a/b/c", "-lead/name", "ns/name--x", "no-namespace", ""])
def test_invalid_repository_ids_fail_before_anything_happens(repo_id, trainer_output, hub_env, capsys):
    folder, _ = trainer_output
    before = len(fake_hub.requests_log(hub_env.root))
    assert hub_upload.main(["--", str(folder), repo_id]) == 2  # "--": a leading "-" is not an option
    assert "repo_id=" in capsys.readouterr().err
    assert len(fake_hub.requests_log(hub_env.root)) == before


def test_no_token_fails_clearly_and_sends_nothing(trainer_output, hub, monkeypatch, tmp_path, capsys):
    folder, _ = trainer_output
    _point_at(monkeypatch, hub, tmp_path, token=None)
    before = len(fake_hub.requests_log(hub.root))
    assert hub_upload.main([str(folder), "fake-user/no-token"]) == 2
    assert "No Hugging Face token" in capsys.readouterr().err
    with (
        hub_upload.plan_upload(folder, "fake-user/no-token", nfe_tokens=0) as plan,
        pytest.raises(ValueError, match="HF_TOKEN"),
    ):
        hub_upload.upload(plan, "fake-user/no-token")
    assert len(fake_hub.requests_log(hub.root)) == before


def test_a_file_holding_the_token_is_never_uploaded(trainer_output, hub_env, capsys):
    folder, _ = trainer_output
    before = len(fake_hub.requests_log(hub_env.root))
    assert hub_upload.main([str(folder), "fake-user/leak", "--include", ".env", "--nfe-tokens", "0"]) == 2
    out, err = capsys.readouterr()
    assert ".env contains your Hugging Face token" in err and FAKE_TOKEN not in out + err
    assert len(fake_hub.requests_log(hub_env.root)) == before


def test_a_wrong_token_is_refused_by_the_hub_before_the_repository_exists(
    trainer_output, hub, monkeypatch, tmp_path, capsys
):
    folder, _ = trainer_output
    wrong = "hf_WrongTokenForTests_9876543210"
    _point_at(monkeypatch, hub, tmp_path, token=wrong)
    assert hub_upload.main([str(folder), "fake-user/wrong-token", "--nfe-tokens", "0"]) == 1
    out, err = capsys.readouterr()
    assert "upload failed" in err and wrong not in out + err
    assert fake_hub.read_repo(hub.root, "fake-user/wrong-token") is None
