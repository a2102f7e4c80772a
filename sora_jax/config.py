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
import logging
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
  if "config" in flags.FLAGS and flags.FLAGS["config"].present:
    try:
      _loaded()
    except Exception as e:  # the config module itself failed to load or run
      _fail(f"could not load {flags.FLAGS['config'].serialize()}: {_one_line(e)}")
  return rest


def get_config() -> ml_collections.ConfigDict:
  """The resolved, locked config of this run (after flags were parsed), its optional keys filled in."""
  return complete(_loaded())


def _loaded() -> ml_collections.ConfigDict:
  """The config as its module and the --config.* flags made it."""
  cfg = _CONFIG.value if _CONFIG is not None else None
  if cfg is None:
    _fail("--config is required, e.g. --config experiments/shapes_demo.py")
  if not isinstance(cfg, ml_collections.ConfigDict):
    # config_flags returns an error placeholder for an unloadable file; touching it raises.
    cfg.to_dict()  # raises with the loader's message
  return cfg


# Keys a config may lack, with what their absence has always meant: configs written before a key existed
# (a bundle's or a training run's config.json), and keys experiments/common.py's builders leave to the
# experiment that needs them (data.text_source, sample.max_tokens, compile_check.cost). Every other key of
# a section is set by its builder, and code reads all keys as attributes. `sample` is filled in even where
# a config has no such section: its keys are the sampler's defaults for any config.
OPTIONAL_KEYS = {
    "data": dict(source="latents", text_source="tokenizer", tokenizer="", latents_dir="", videos_dir="",
                 mixture="demo", token_budget=0, min_patch_side=2, packer="best_fit", packing_bins=16,
                 read_threads=1, sample_latents=True, stand_in_factors=(4, 8, 8)),
    "dit": dict(patch=(1, 2, 2), in_dim=0, context="none", attention_axes=("full",), mlp_conv=False, abs_pos=False),
    "diffusion": dict(prediction="v", cosine_s=0.008, shift_rule="tokens", object_weight=0.0,
                      loss_weight="uniform", frame_noise_share=0.0, frame_diff_weight=0.0),
    "sample": dict(sampler="", time_grid="uniform", steps=30, guidance=1.0, num_frames=17, height=32,
                   width=32, fps=8.0, row_len=0, max_tile_pixels=0, max_tokens=0, unipc=None),
    "compile_check": dict(cost="shallow"),
}
ALWAYS_SECTIONS = ("sample",)


def complete(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills in `cfg`'s missing OPTIONAL_KEYS (and the `sample` section), in place, and returns it: the one
  place a config becomes what the code reads, called where a config enters the library (get_config, a
  bundle's or a run's config.json, and the readers of the optional keys, which may be handed a config
  module's own ConfigDict). Idempotent; a locked config is unlocked for it and stays locked."""
  with cfg.unlocked():
    for name, keys in OPTIONAL_KEYS.items():
      if name not in cfg:
        if name not in ALWAYS_SECTIONS:
          continue
        cfg[name] = ml_collections.ConfigDict()
      section = cfg[name]
      for key, value in keys.items():
        if key not in section:
          section[key] = value
  return cfg


def _caller_module(depth: int) -> str:
  """The name absl gives the module `depth` frames up: the script's path for __main__ (what `--help`
  lists the flags of)."""
  name = sys._getframe(depth + 1).f_globals.get("__name__", "")  # pylint: disable=protected-access
  return sys.argv[0] if name == "__main__" else name


def flag(define: Callable, name: str, *args, **kwargs) -> flags.FlagHolder:
  """`define(name, ...)` once per process: entry points share names like --workdir, and tests import
  several entry points into one process; a second definition reuses the first flag. Either way the flag
  belongs to the calling module, so that `--help` of that entry point lists it (absl would otherwise
  file it under this module, and only `--helpfull` would show it)."""
  module = _caller_module(1)
  if name not in flags.FLAGS:
    define(name, *args, **kwargs)
  flags.FLAGS.register_key_flag_for_module(module, flags.FLAGS[name])
  return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])


def run(main: Callable[[list[str]], None], *, config: bool = True) -> None:
  """`absl.app.run` with one-line errors for bad configs and bad flags (exit 2); `config=False` for
  commands that take no --config (the offline jobs)."""
  if config:
    _define_config_flag()
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["config"])  # listed by --help
  app.run(lambda argv: main(_quiet_libraries(argv)), flags_parser=_parse_flags)


class _DropMissingMetadata(logging.Filter):
  """orbax warns "Metadata file does not exist" on every read of a checkpoint item written inside a
  CheckpointManager step (the step, not the item, holds the metadata): nothing is wrong."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Metadata file does not exist")


def _quiet_libraries(argv: list[str]) -> list[str]:
  """Libraries that log through absl (orbax: some 40 INFO lines per checkpoint read) keep warnings and
  errors only, unless the command line asks for more (--verbosity / -v); the commands print their own
  progress. Returns argv."""
  absl_logger = logging.getLogger("absl")
  if not flags.FLAGS["verbosity"].present:
    # The absl logger only: absl's own set_verbosity would raise the root logger's level too, silencing
    # the commands' own INFO progress lines (compile_check's, distributed's).
    absl_logger.setLevel(logging.WARNING)
  absl_logger.addFilter(_DropMissingMetadata())
  return argv


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def _main(argv):
  del argv
  print(to_json(_loaded()))  # as the config module wrote it (the keys it lacks mean OPTIONAL_KEYS's)


if __name__ == "__main__":
  run(_main)
