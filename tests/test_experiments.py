"""experiments/: every module reads on its own (it imports no other experiment; experiments/common.py's
section builders are all they share), and the config command prints every module's whole config."""
import ast
import importlib
import json
import os
import subprocess
import sys

import pytest

from sora_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments"))
                     if f.endswith(".py") and not f.startswith("_") and f != "common.py")


def _imported_modules(name: str) -> set[str]:
  """Every module `experiments/<name>.py` imports (`from a import b` counts as a.b), at any depth."""
  tree = ast.parse(open(os.path.join(ROOT, "experiments", f"{name}.py")).read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      out.add(node.module or "")
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def test_the_experiments_are_found():
  assert {"shapes_demo", "sora_b", "sora_xl_minute", "wan21_finetune"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS + ["common"])
def test_no_experiment_imports_another(name):
  imports = _imported_modules(name)
  others = {m for m in imports if m.startswith("experiments.") and m != "experiments.common"}
  assert not others, f"experiments/{name}.py imports {sorted(others)}: share builders in common.py instead"
  assert "importlib" not in imports and "importlib.util" not in imports, (
      f"experiments/{name}.py loads modules by path")
  if name == "common":
    assert not {m for m in imports if m.startswith("experiments")}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_command_prints_the_whole_config(name):
  r = subprocess.run([sys.executable, "-m", "sora_jax.config", "--config", f"experiments/{name}.py"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  cfg = json.loads(r.stdout)
  assert "data" in cfg and "seed" in cfg
  module = importlib.import_module(f"experiments.{name}")
  assert cfg == json.loads(config_lib.to_json(module.get_config()))


@pytest.mark.parametrize("size, base", [("1.3b", "wan21_t2v_1_3b"), ("14b", "wan21_t2v_14b")])
def test_fine_tuning_starts_from_the_published_models(size, base):
  """wan21_finetune.py states the two Wan 2.1 models' settings itself; they must stay the t2v configs'
  (same default slice), or a fine-tuning run would not match the converted bundle it starts from."""
  ft = importlib.import_module("experiments.wan21_finetune").get_config(f"size={size}")
  published = importlib.import_module(f"experiments.{base}").get_config()
  for section in ("dit", "text", "vae", "sample", "diffusion", "mesh"):
    assert ft[section].to_dict() == published[section].to_dict(), section
  for key in ("seq_len", "max_segments", "text_len", "batch_size"):
    assert ft.data[key] == published.data[key], key
