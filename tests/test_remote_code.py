"""Checkpoints load anywhere: a fresh process without this project, through every auto class, offline,
under the transformers 5.x we install and under the last 4.x release (4.57)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modeling_bd3lm import BD3LMForMaskedDiffusion
from tests.conftest import REPO_ROOT, random_model

# Runs in the child: hide this project (cwd, PYTHONPATH, an editable install), prove it is hidden, then load.
CHILD = r"""
import importlib.util, json, sys
sys.path = [p for p in sys.path if p not in ("", ".", REPO)]
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "") and
                 "__editable__" not in getattr(f, "__name__", "")]
assert importlib.util.find_spec("modeling_bd3lm") is None, "the project is importable in the child"
import torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
inputs = load_file(FOLDER + "/inputs.safetensors")
out = {}
assert AutoConfig.from_pretrained(FOLDER, trust_remote_code=True).model_type == "bd3lm"
for auto in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
    model = auto.from_pretrained(FOLDER, trust_remote_code=True).eval()
    assert type(model).__name__ == "BD3LMForMaskedDiffusion", type(model)
    assert model.can_generate()
    with torch.no_grad():
        out[auto.__name__ + ".train"] = model(inputs["x_0"], noisy_input_ids=inputs["x_t"], return_dict=True).logits
        out[auto.__name__ + ".sample"] = model(inputs["x_t"], return_dict=True).logits
save_file(out, FOLDER + "/child_logits.safetensors")
print(transformers.__version__)
"""


def _tf4_python() -> Path | None:
    python = Path(os.environ.get("BD3LM_TF4_PYTHON", REPO_ROOT / ".venv-457" / "bin" / "python"))
    return python if python.exists() else None


def _interpreters() -> list:
    params = [pytest.param(Path(sys.executable), id="transformers-5.x")]
    tf4 = _tf4_python()
    if tf4 is not None:
        params.append(pytest.param(tf4, id="transformers-4.57"))
    elif os.environ.get("BD3LM_REQUIRE_TF4") == "1":
        params.append(pytest.param(None, id="transformers-4.57"))
    else:
        params.append(
            pytest.param(None, id="transformers-4.57", marks=pytest.mark.skip(reason="run tests/make_tf4_env.sh first"))
        )
    return params


@pytest.mark.parametrize("python", _interpreters())
def test_saved_model_loads_in_a_fresh_process_without_this_project(python, tmp_path):
    if python is None:
        pytest.fail("BD3LM_REQUIRE_TF4=1 but the transformers 4.57 environment is missing: run tests/make_tf4_env.sh")
    model = random_model(block_size=4)
    model.set_noise_interval(0.3, 0.8)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM", "AutoModelForCausalLM"}
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    # Every module of the package travels with the weights (save_pretrained follows the relative imports).
    modules = sorted(p.name for p in (REPO_ROOT / "modeling_bd3lm").glob("*_bd3lm.py"))
    assert len(modules) >= 9 and "outputs_bd3lm.py" in modules and "generation_config_bd3lm.py" in modules
    for name in modules:
        assert (tmp_path / name).exists(), name

    g = torch.Generator().manual_seed(0)
    x_0 = torch.randint(0, 63, (2, 32), generator=g)
    x_t = torch.where(torch.rand(2, 32, generator=g) < 0.5, torch.full_like(x_0, 63), x_0)
    save_file({"x_0": x_0, "x_t": x_t}, tmp_path / "inputs.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    child = CHILD.replace("REPO", repr(str(REPO_ROOT))).replace("FOLDER", repr(str(tmp_path)))
    result = subprocess.run(
        [str(python), "-c", child], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]

    from safetensors.torch import load_file

    child_logits = load_file(tmp_path / "child_logits.safetensors")
    with torch.no_grad():
        train = model(x_0, noisy_input_ids=x_t, return_dict=True).logits
        sample = model(x_t, return_dict=True).logits
    for name, logits in child_logits.items():
        expected = train if name.endswith("train") else sample
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    reloaded = BD3LMForMaskedDiffusion.from_pretrained(tmp_path)
    assert reloaded.training_noise_interval() == pytest.approx((0.3, 0.8))
