"""Supply-chain safety and determinism.

* No pickle: our code never unpickles (no `pickle`, `torch.load`, `allow_pickle`), writes weights as safetensors only,
  and `from_pretrained` refuses pickle weights (also tests/test_hardening_faults.py).
* The checkpoint bundle (the code `save_pretrained` copies next to the weights, run by `trust_remote_code=True`)
  imports only torch, transformers, a fixed list of standard-library modules and its own files.
* No `custom_generate/`: we ship none, hub_upload never publishes one, and our `generate()` never runs one.
* Determinism on CPU: the same seed gives the same samples and the same loss (and the same training run).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import torch

import hub_upload
from bd3lm_trainer import BD3LMTrainer
from modeling_bd3lm import BD3LMForMaskedDiffusion
from modeling_bd3lm.sampling_bd3lm import SAMPLERS
from tests.conftest import (
    REPO_ROOT,
    random_model,
    random_token_dataset,
    tiny_train_model,
    tiny_training_args,
)

OUR_CODE = [
    REPO_ROOT / "hub_upload.py",
    *(
        path
        for folder in ("modeling_bd3lm", "trainer", "configuration", "bench")
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
    ),
]
# The standard-library modules the bundle may import; anything else (pickle, subprocess, socket, ...) needs review.
BUNDLE_STDLIB = {
    "__future__",
    "collections",
    "contextlib",
    "contextvars",
    "copy",
    "dataclasses",
    "functools",
    "inspect",
    "math",
    "os",
    "re",
    "time",
    "typing",
    "warnings",
}
BUNDLE_THIRD_PARTY = {"torch", "transformers"}


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(level, module) of every import in a module, nested ones included; level > 0 is a relative import."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def _calls(tree: ast.AST) -> list[str]:
    """Dotted names of every call (`torch.load`, `pickle.loads`, ...) and every keyword=value pair passed."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            names.append(ast.unparse(node.func))
            names += [f"{kw.arg}={ast.unparse(kw.value)}" for kw in node.keywords if kw.arg]
    return names


# ----------------------------------------------------------------------------------------------------------------------
# No pickle anywhere in our code


FORBIDDEN_CALLS = {"torch.load", "torch.save", "np.load", "numpy.load"}
FORBIDDEN_KEYWORDS = {"allow_pickle=True", "weights_only=False", "use_safetensors=False", "safe_serialization=False"}
TRANSFORMERS_RESUME_STATE = {"optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "training_args.bin"}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}


def test_our_code_never_unpickles_nor_writes_pickles():
    assert len(OUR_CODE) > 20
    offences = []
    for path in OUR_CODE:
        tree = ast.parse(path.read_text(), filename=str(path))
        offences += [f"{path}: imports {m}" for _, m in _imports(tree) if m.split(".")[0] in PICKLE_MODULES]
        offences += [
            f"{path}: {call}"
            for call in _calls(tree)
            if call in FORBIDDEN_CALLS | FORBIDDEN_KEYWORDS or "pickle" in call.split("=")[0].lower()
        ]
    assert offences == []


def test_saved_models_and_checkpoints_hold_safetensors_only(tmp_path):
    random_model().save_pretrained(tmp_path / "model")
    assert {p.suffix for p in (tmp_path / "model").iterdir()} <= {".json", ".py", ".safetensors"}
    args = tiny_training_args(
        tmp_path, max_steps=1, save_strategy="steps", save_steps=1, schedule_search=False, use_ema=True
    )
    BD3LMTrainer(tiny_train_model(), args, train_dataset=random_token_dataset(8)).train()
    files = {p.name for p in (tmp_path / "out" / "checkpoint-1").iterdir()}
    assert {"model.safetensors", "ema_state.safetensors"} <= files
    # The only torch-serialised files are transformers' own resume state, which transformers reads back with
    # torch.load(weights_only=True) and hub_upload never publishes.
    assert {f for f in files if f.endswith((".bin", ".pt", ".pth"))} <= TRANSFORMERS_RESUME_STATE


# ----------------------------------------------------------------------------------------------------------------------
# The bundle imports only torch, transformers and its own files


def test_the_checkpoint_bundle_imports_only_torch_transformers_and_itself(tmp_path):
    random_model().save_pretrained(tmp_path)
    bundle = sorted(tmp_path.glob("*.py"))
    shipped = {p.stem for p in bundle}
    assert shipped == {p.stem for p in (REPO_ROOT / "modeling_bd3lm").glob("*_bd3lm.py")}
    outside, unresolved = set(), []
    for path in bundle:
        tree = ast.parse(path.read_text())
        for level, module in _imports(tree):
            if level == 0:
                outside.add(module.split(".")[0])
            elif level != 1 or module.split(".")[0] not in shipped:
                unresolved.append(f"{path.name}: from {'.' * level}{module}")
        dynamic = [c for c in _calls(tree) if c in ("__import__", "exec", "eval", "importlib.import_module", "compile")]
        assert dynamic == [], f"{path.name} runs dynamic code: {dynamic}"
    assert unresolved == []
    assert outside - BUNDLE_STDLIB - BUNDLE_THIRD_PARTY == set()
    assert outside >= BUNDLE_THIRD_PARTY
    assert BUNDLE_STDLIB <= set(sys.stdlib_module_names) | {"__future__"}


# ----------------------------------------------------------------------------------------------------------------------
# custom_generate: none shipped, none published, none run


CUSTOM_GENERATE = """
from pathlib import Path

Path(__file__).with_name("RAN").write_text("custom generate code ran")


def generate(model, *args, **kwargs):
    Path(__file__).with_name("RAN").write_text("custom generate() ran")
    raise SystemExit("custom generate() ran")
"""


def _custom_generate_folders() -> list[Path]:
    """custom_generate/ folders in the repository top level and in the shipped packages."""
    found = [
        path
        for name in ("modeling_bd3lm", "trainer", "configuration")
        for path in (REPO_ROOT / name).rglob("custom_generate")
    ]
    return found + [REPO_ROOT / "custom_generate"] * (REPO_ROOT / "custom_generate").exists()


@pytest.fixture
def folder_with_custom_generate(tmp_path) -> Path:
    folder = tmp_path / "model"
    random_model(bos_token_id=1, pad_token_id=0).save_pretrained(folder)
    (folder / "custom_generate").mkdir()
    (folder / "custom_generate" / "generate.py").write_text(CUSTOM_GENERATE)
    return folder


def test_we_ship_no_custom_generate_folder(tmp_path):
    assert not _custom_generate_folders(), "a custom_generate/ folder appeared: see the stance below"
    random_model().save_pretrained(tmp_path)
    assert not (tmp_path / "custom_generate").exists()


def test_hub_upload_never_publishes_a_custom_generate_folder(folder_with_custom_generate):
    with hub_upload.plan_upload(folder_with_custom_generate, "user/model", nfe_tokens=0) as plan:
        assert not [f.path for f in plan.files if "custom_generate" in f.path]
        assert any("custom_generate" in str(getattr(left, "path", left)) for left in plan.left_out)


def test_hub_upload_refuses_to_include_custom_generate_on_request(folder_with_custom_generate):
    with pytest.raises(ValueError, match="custom_generate"):
        with hub_upload.plan_upload(
            folder_with_custom_generate, "user/model", nfe_tokens=0, include=["custom_generate/*"]
        ):
            pass


def test_our_generate_never_runs_custom_generate_code(folder_with_custom_generate):
    folder = folder_with_custom_generate
    model = BD3LMForMaskedDiffusion.from_pretrained(folder, trust_remote_code=True)
    out = model.generate(max_new_tokens=4, seed=0)
    assert out.shape == (1, 5)
    with pytest.raises(ValueError, match="does not use.*custom_generate"):
        model.generate(max_new_tokens=4, custom_generate=str(folder), trust_remote_code=True)
    assert not (folder / "custom_generate" / "RAN").exists()


def test_a_shipped_custom_generate_would_require_a_transformers_that_gates_it():
    """Before transformers 5.12.0 (PR #46483; checked in the wheels: `load_custom_generate` passes
    `has_local_code=False` from 5.12.0 on, not in 5.11.0) a local custom_generate/generate.py ran without
    `trust_remote_code`. The package supports 4.57, which is fine only while nothing ships one."""
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    lower = re.search(r'"transformers>=([0-9.]+)', pyproject)
    assert lower is not None, "pyproject.toml must bound transformers from below"
    version = tuple(int(part) for part in lower.group(1).split(".")[:2])
    assert not _custom_generate_folders() or version >= (5, 12)


# ----------------------------------------------------------------------------------------------------------------------
# Determinism on CPU


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_the_same_seed_gives_the_same_samples(sampler):
    model = random_model(bos_token_id=1, pad_token_id=0)
    prompt = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=12, do_sample=True, sampler=sampler, temperature=1.5)
    first = model.generate(prompt, seed=7, **kwargs)
    assert torch.equal(model.generate(prompt, seed=7, **kwargs), first)
    # one row: a seed draws what a generator with that seed draws (with more rows, each row has a stream of its own)
    alone = model.generate(prompt[:1], seed=7, **kwargs)
    assert torch.equal(model.generate(prompt[:1], generator=torch.Generator().manual_seed(7), **kwargs), alone)
    torch.manual_seed(7)  # the global RNG is used when neither seed nor generator is given
    global_first = model.generate(prompt, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(model.generate(prompt, **kwargs), global_first)
    others = [model.generate(prompt, seed=seed, **kwargs) for seed in range(8, 12)]
    assert any(not torch.equal(other, first) for other in others)  # the seed does matter


def test_the_same_seed_gives_the_same_loss():
    model = random_model(dropout=0.1).train()  # dropout and the noise draw both follow the seed
    x = torch.randint(0, 63, (4, 32), generator=torch.Generator().manual_seed(0))

    def loss(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return model(x, labels=x, generator=torch.Generator().manual_seed(seed), return_dict=True).loss

    assert torch.equal(loss(0), loss(0))
    assert not torch.equal(loss(0), loss(1))
    model.eval()
    assert torch.equal(loss(3), loss(3))


def test_the_same_seed_gives_the_same_training_run(tmp_path):
    def run(seed: int, name: str):
        args = tiny_training_args(
            tmp_path / name, max_steps=3, logging_steps=1, seed=seed, schedule_search=False, learning_rate=1e-2
        )
        trainer = BD3LMTrainer(tiny_train_model(), args, train_dataset=random_token_dataset(32))
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, {k: v.clone() for k, v in trainer.model.state_dict().items()}

    losses, weights = run(0, "a")
    again_losses, again_weights = run(0, "b")
    assert again_losses == losses and len(losses) == 3
    assert all(torch.equal(again_weights[k], weights[k]) for k in weights)
    other_losses, _ = run(1, "c")
    assert other_losses != losses


def test_loading_a_folder_writes_nothing_into_it(folder_with_custom_generate):
    before = sorted(p.relative_to(folder_with_custom_generate) for p in folder_with_custom_generate.rglob("*"))
    BD3LMForMaskedDiffusion.from_pretrained(folder_with_custom_generate)
    after = sorted(p.relative_to(folder_with_custom_generate) for p in folder_with_custom_generate.rglob("*"))
    assert after == before
