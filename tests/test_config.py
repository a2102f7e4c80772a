"""The config command line: configs as Python modules, locked, with one-line errors (every experiment
module through it: tests/test_experiments.py)."""
import json
import os
import subprocess
import sys

import pytest

from sora_jax.config import parse_arg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_cli(*args):
  return subprocess.run([sys.executable, "-m", "sora_jax.config", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_override_and_arg_apply():
  r = _config_cli("--config", "experiments/shapes_demo.py:runlocal", "--config.data.seq_len=512")
  assert r.returncode == 0, r.stderr
  cfg = json.loads(r.stdout)
  assert cfg["data"]["seq_len"] == 512
  assert cfg["data"]["num_train"] == 64  # set by the runlocal arg


@pytest.mark.parametrize("args, needle", [
    (("--config.data.seq_lenn=3",), "seq_lenn"),
    (("--config.data.seq_len=abc",), "--config.data.seq_len=abc"),
    (("--config.nosuchsection.x=1",), "nosuchsection"),
])
def test_bad_key_or_type_is_one_line_naming_it(args, needle):
  r = _config_cli("--config", "experiments/shapes_demo.py", *args)
  assert r.returncode != 0
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, r.stderr
  assert needle in lines[0]


def test_bad_config_arg_and_missing_file():
  r = _config_cli("--config", "experiments/shapes_demo.py:bogus")
  assert r.returncode != 0 and "bogus" in r.stderr and len(r.stderr.strip().splitlines()) == 1
  r = _config_cli("--config", "experiments/nope.py")
  assert r.returncode != 0 and "nope.py" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_parse_arg_types():
  a = parse_arg("variant=B,runlocal,steps=7", variant="S", runlocal=False, steps=1)
  assert (a.variant, a.runlocal, a.steps) == ("B", True, 7)
  with pytest.raises(ValueError, match="unknown"):
    parse_arg("nope=1", variant="S")
