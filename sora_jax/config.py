"""Configs as Python modules, and the one place that turns command lines into them.

Every entry point declares its flags, then calls `config.run(main)` instead of `absl.app.run`.
A config is `experiments/x.py[:arg]` whose `get_config(arg)` returns a ConfigDict; it is locked,
so `--config.a.b=value` may only set keys that exist, with a value of the key's type. Any mistake
ends the program with one line that names the bad key or value and what is accepted.

    python -m sora_jax.config --config experiments/shapes_demo.py --config.dit.depth=4
prints the resolved config as JSON.
"""
from __future__ import annotations

import json
import sys
from typing import Callable

from absl import app, flags
import ml_collections
from ml_collections import config_flags

class ConfigError(ValueError):
  """A config value a command cannot run with; its message is the one line the command prints."""


_CONFIG = None  # the --config flag, defined by run(): config modules import this file too


def _define_config_flag() -> None:
  global _CONFIG
  if _CONFIG is None:
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "experiments/x.py[:arg]; override keys with --config.a.b=value",
        lock_config=True)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config module's `arg` ("variant=B,runlocal") into a ConfigDict of its defaults.

  Every key must be one of `defaults`; a bare word sets that key to True; values take the
  default's type.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is unknown; accepted: {sorted(defaults)}")
    default = defaults[key]
    if not value:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif default is not None:
      out[key] = type(default)(value)
    else:
      out[key] = value
  return out


def _one_line(e: Exception) -> str:
  text = str(e)
  if "Traceback" in text:  # a config module raised: keep the flag and its exception's last line
    lines = [l for l in text.splitlines() if l.strip()]
    text = lines[0].split("Error whilst")[0] + lines[-1]
  text = text.replace("\\n", " ").replace("\\'", "").replace("\\", "")
  return " ".join(text.replace("\"'", "").replace("'\"", "").split())


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that ends bad input with one line instead of a traceback."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(_one_line(e))
  except (AttributeError, KeyError) as e:
    bad = " ".join(a for a in argv if a.startswith("--config."))
    _fail(f"unknown config key in {bad}: {_one_line(e)} "
          "(`python -m sora_jax.config --config ...` lists the keys)")
  except (TypeError, ValueError) as e:
    _fail(f"bad config value: {e}")
  if flags.FLAGS["config"].present:
    try:
      get_config()
    except Exception as e:  # the config module itself failed to load or run
      _fail(f"could not load {flags.FLAGS['config'].serialize()}: {_one_line(e)}")
  return rest


def get_config() -> ml_collections.ConfigDict:
  """The resolved, locked config of this run (after flags were parsed)."""
  cfg = _CONFIG.value if _CONFIG is not None else None
  if cfg is None:
    _fail("--config is required, e.g. --config experiments/shapes_demo.py")
  if not isinstance(cfg, ml_collections.ConfigDict):
    # config_flags returns an error placeholder for an unloadable file; touching it raises.
    cfg.get("")  # raises with the loader's message
  return cfg


def flag(define: Callable, name: str, *args, **kwargs) -> flags.FlagHolder:
  """`define(name, ...)` once per process: entry points share names like --workdir, and tests import
  several entry points into one process; a second definition reuses the first flag."""
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return define(name, *args, **kwargs)


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run` with one-line errors for bad configs and bad flags."""
  _define_config_flag()
  app.run(main, flags_parser=_parse_flags)


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def _main(argv):
  del argv
  print(to_json(get_config()))


if __name__ == "__main__":
  run(_main)
