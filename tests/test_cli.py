"""The `bd3lm` command line: every subcommand's help, one-line errors for user mistakes, and a real train -> generate ->
eval -> upload --dry-run -> demo chain on a few hundred tokens of the embedded corpus."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bd3lm_trainer import build_lm_dataset
from bd3lm_trainer.cli import build_parser, main
from bd3lm_trainer.cli.train import _data_record
from bd3lm_trainer.corpus import load_corpus, load_tokenizer

SUBCOMMANDS = ("demo", "train", "generate", "eval", "draft")
FAST_TRAIN = [
    "--model-length",
    "32",
    "--max-steps",
    "3",
    "--batch-size",
    "2",
    "--warmup-steps",
    "1",
    "--eval-steps",
    "3",
    "--save-steps",
    "3",
    "--eval-batches",
    "1",
    "--search-batches",
    "1",
]


@pytest.fixture(scope="module")
def text_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two small JSON Lines files cut from the embedded corpus (train, validation)."""
    folder = tmp_path_factory.mktemp("text")
    paths = []
    for split, n_chars in (("train", 4000), ("validation", 1500)):
        text = load_corpus(split)[0]["text"][:n_chars]
        path = folder / f"{split}.jsonl"
        path.write_text("\n".join(json.dumps({"text": text[i : i + 500]}) for i in range(0, len(text), 500)) + "\n")
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, text_files: tuple[Path, Path]) -> Path:
    output = tmp_path_factory.mktemp("run") / "tiny"
    train, validation = text_files
    argv = ["train", "--dataset", str(train), "--eval-dataset", str(validation), "--output-dir", str(output)]
    assert main(argv + FAST_TRAIN) == 0
    return output


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in (*SUBCOMMANDS, "upload"):
        assert name in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_is_explained(command: str, capsys: pytest.CaptureFixture) -> None:
    parser = _subparsers(build_parser())[command]
    undocumented = [a.dest for a in parser._actions if a.dest != "help" and not (a.help and a.help.strip())]
    assert undocumented == []
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: bd3lm " + command in capsys.readouterr().out


def test_upload_help_is_hub_uploads(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["upload", "--help"])
    assert exit_info.value.code == 0
    assert "--dry-run" in capsys.readouterr().out


def test_console_script_runs(tmp_path: Path) -> None:
    """The installed `bd3lm` entry point (not just `main`) starts and reports a user mistake in one line."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from bd3lm_trainer.cli import main; sys.exit(main())",
            "generate",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"bd3lm generate: error: model {str(tmp_path / 'missing')!r} is neither a folder nor a Hub id (owner/name)"
    ]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--max-steps", "0"], "--max-steps must be positive"),
        (["train", "--batch-size", "-1"], "--batch-size must be positive"),
        (["train", "--learning-rate", "0"], "--learning-rate must be positive"),
        (["train", "--block-size", "0"], "--block-size must be positive"),
        (["train", "--dataset", "no/such/file.txt"], "--dataset 'no/such/file.txt' does not exist"),
        (["train", "--init-from", "not a model"], "--init-from 'not a model'"),
        (["train", "--tokenizer", "bad name!"], "--tokenizer 'bad name!'"),
        (["train", "--block-size", "5", "--max-steps", "1"], "block_size"),
        (["generate", "missing-folder"], "neither a folder nor a Hub id"),
        (["generate", ".", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
        (["generate", ".", "--num-samples", "0"], "--num-samples must be positive"),
        (["demo", "--confidence-threshold", "1.5"], "--confidence-threshold must be in (0, 1]"),
        (["demo", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
        (["demo", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["generate", ".", "--greedy", "--top-p", "0.9"], "--greedy takes the argmax"),
    ],
)
def test_user_mistakes_are_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    argv = [a.replace("no/such", str(tmp_path / "no/such")) for a in argv]
    needle = needle.replace("no/such", str(tmp_path / "no/such"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"bd3lm {argv[0]}: error: ")
    assert needle in err[0]


def test_folder_without_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"bd3lm generate: error: {tmp_path} has no config.json; is it a trained model folder?"
    )


def test_resume_without_checkpoint_is_one_line(
    tmp_path: Path, text_files: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    train, validation = text_files
    argv = [
        "train",
        "--dataset",
        str(train),
        "--eval-dataset",
        str(validation),
        "--output-dir",
        str(tmp_path),
        "--resume",
    ]
    assert main(argv + FAST_TRAIN) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"bd3lm train: error: --resume: no complete checkpoint-* folder in {tmp_path}"
    )


def test_train_writes_a_loadable_model(trained: Path) -> None:
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "eval_results.json"):
        assert (trained / name).is_file(), name
    metrics = json.loads((trained / "eval_results.json").read_text())
    assert metrics["eval_loss"] > 0 and metrics["eval_ppl"] > 1
    config = json.loads((trained / "config.json").read_text())
    assert config["model_length"] == 32 and config["block_size"] == 4
    assert (trained / "checkpoint-3").is_dir()


def test_train_records_its_data(trained: Path, text_files: tuple[Path, Path]) -> None:
    """`training_data.json`: each dataset's name (a local file by its file name only), licence and size in tokens."""
    text = (trained / "training_data.json").read_text()
    assert str(text_files[0].parent) not in text  # no directory of the user's machine
    chunks = len(build_lm_dataset(str(text_files[0]), load_tokenizer(), 32))
    assert json.loads(text) == {
        "train": {
            "name": "train.jsonl",
            "description": "a local file",
            "license": None,
            "chunks": chunks,
            "tokens": 32 * chunks,
        },
        "evaluation": {
            "name": "validation.jsonl",
            "description": "a local file",
            "license": None,
            "chunks": 2,
            "tokens": 64,
        },  # --eval-batches 1 x --batch-size 2
    }


def test_embedded_corpus_record() -> None:
    assert _data_record(None, "train", range(5), 32) == {
        "name": "bd3lm-corpus",
        "description": "King James Bible + Shakespeare, the embedded English corpus of the bd3lm package",
        "license": "public domain",
        "split": "train",
        "chunks": 5,
        "tokens": 160,
    }


def test_train_resume_continues_from_the_checkpoint(trained: Path, text_files: tuple[Path, Path], capsys) -> None:
    train, validation = text_files
    argv = ["train", "--dataset", str(train), "--eval-dataset", str(validation), "--output-dir", str(trained)]
    fast = [a if a != "3" else "4" for a in FAST_TRAIN]  # max-steps 4 (and eval/save every 4): one more step
    assert main(argv + fast + ["--resume"]) == 0
    state = json.loads((trained / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert min(log["step"] for log in state["log_history"] if "loss" in log or "eval_loss" in log) <= 3


def test_generate_streams_and_counts_network_calls(trained: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["generate", str(trained), "--prompt", "And God said", "--max-new-tokens", "8", "--seed", "1"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("And God said") and "[8 tokens, 8 network calls]" in first
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # same seed, same sample
    assert main(argv + ["--sampler", "confidence_threshold", "--confidence-threshold", "0.5", "--no-stream"]) == 0
    assert "network calls]" in capsys.readouterr().out


def test_sampling_options_are_applied(trained: Path, capsys: pytest.CaptureFixture) -> None:
    """`--temperature` / `--greedy` change the sample (HF's do_sample=False default would silently ignore them)."""
    argv = ["generate", str(trained), "--prompt", "And God", "--max-new-tokens", "16", "--no-stream"]
    outputs = []
    for extra in ([], ["--temperature", "0.05"], ["--greedy"]):
        assert main(argv + extra) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] != outputs[1]
    assert outputs[0] != outputs[2]


def test_sampler_choices_are_the_models() -> None:
    from bd3lm_trainer.cli import SAMPLER_NAMES
    from modeling_bd3lm.sampling_bd3lm import SAMPLERS

    assert sorted(SAMPLER_NAMES) == sorted(SAMPLERS)


def test_generate_bad_sampler_fails_before_loading(trained: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(trained), "--sampler", "beam"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Loading" not in err and "argument --sampler: invalid choice: 'beam'" in err.strip().splitlines()[-1]


def test_eval_reports_the_bound(trained: Path, text_files: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    _, validation = text_files
    assert main(["eval", str(trained), "--dataset", str(validation), "--max-documents", "2", "--batch-size", "2"]) == 0
    assert "nelbo" in capsys.readouterr().out.lower()


def test_upload_dry_run_sends_nothing(trained: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["upload", str(trained), "someone/tiny-bd3lm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "README.md" in out and "optimizer.pt" not in out.split("Left out")[0]


def test_demo_end_to_end(tmp_path: Path, text_files: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    train, validation = text_files
    output = tmp_path / "demo"
    argv = ["demo", "--dataset", str(train), "--eval-dataset", str(validation), "--output-dir", str(output)]
    assert main(argv + FAST_TRAIN + ["--max-new-tokens", "8", "--prompt", "And God"]) == 0
    out = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in out
    assert "perplexity bound" in out and "network calls per token" in out and "tokens/s" in out
    assert "same tokens from the same seed" in out
    hub = output / "hub"
    for name in (
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "modeling_bd3lm.py",
        "configuration_bd3lm.py",
    ):
        assert (hub / name).is_file(), name
    assert not (hub / "training_args.bin").exists() and not list(hub.glob("optimizer*"))
    assert json.loads((hub / "config.json").read_text())["auto_map"]["AutoModelForMaskedLM"].startswith(
        "modeling_bd3lm."
    )
    assert (output / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (hub / "README.md").read_text()
    assert "- Training data: `train.jsonl` (a local file); licence: not recorded;" in card
    assert "Data: not recorded" not in card and "| built-in default |" not in card  # only settings that differ
    assert "| `sampler` | `first_hitting` (none stored: the built-in default) |" in card
