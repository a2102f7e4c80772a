"""`make demo`: every stage of sora-jax, end to end, on the embedded Shapes data set.

    python -m sora_jax.demo --config experiments/shapes_demo.py --workdir runs/demo

Stages run in order as separate processes, exactly as a user would run them by hand (each stage's command
is printed first); each one resumes or skips finished work, so re-running the demo after an interruption
continues where it stopped.

The demo trains a fixed number of steps (`vae_train.total_steps`, `train.total_steps`), so what it produces
does not depend on the machine; its configs set no wall-clock cap (`max_train_seconds` = 0; caps are a safety
net for pod jobs). Each stage's time is printed against the time it takes on an idle 2-core CPU
(`config.demo.expected_minutes`), with one line when it is slower than `config.demo.slow_factor` times
that; a trainer that stopped before its steps (a cap set by hand) is named too. Layout of the work
directory:

    W/data/shapes/          rendered Shapes splits (tensorflow-datasets, ArrayRecord)
    W/data/tokenizer.model  sentencepiece model trained on the captions
    W/vae/                  VAE training run (checkpoints, metrics.jsonl, TensorBoard, reconstructions)
    W/data/latents/         the data set encoded into latents, with latent_stats.json
    W/dit/                  DiT training run
    W/bundle/               inference bundle (EMA weights, config, tokenizer, manifest)
    W/samples/              sample videos
    W/eval/                 metrics.json and report.html
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
import subprocess
import sys
import time

from absl import flags

from sora_jax import config as config_lib

_WORKDIR = config_lib.flag(flags.DEFINE_string, "workdir", "runs/demo", "where every stage writes")
_ONLY = config_lib.flag(flags.DEFINE_list, "only", [], "run just these stages (names as printed)")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  target: str          # a module (sora_jax.x) or a script path (data_pipelines/x.py)
  args: tuple[str, ...]

  def command(self) -> list[str]:
    if self.target.endswith(".py"):
      return [sys.executable, os.path.join(_ROOT, self.target), *self.args]
    return [sys.executable, "-m", self.target, *self.args]


def stages(cfg_arg: str, cfg, w: str) -> list[Stage]:
  """The demo's stages; every data path is pointed under the work directory."""
  data = f"{w}/data"
  paths = (f"--config.data.videos_dir={data}/shapes", f"--config.data.latents_dir={data}/latents",
           f"--config.data.tokenizer={data}/tokenizer.model")
  conf = ("--config", cfg_arg, *paths)
  out: list[Stage] = []
  for split, key in (("train", "num_train"), ("validation", "num_validation"), ("test", "num_test")):
    out.append(Stage(f"data-{split}", "data_pipelines/build_shapes.py", (
        f"--out_dir={data}/shapes", f"--split={split}", f"--num_examples={cfg.data[key]}",
        f"--mixture={cfg.data.mixture}", f"--seed={cfg.seed}")))
  out += [
      Stage("tokenizer", "data_pipelines/train_tokenizer.py", (
          f"--data_dir={data}/shapes", f"--out={data}/tokenizer.model",
          f"--vocab_size={cfg.data.vocab_size}")),
      Stage("vae", "sora_jax.train_vae", (*conf, f"--workdir={w}/vae")),
      Stage("latents", "data_pipelines/encode_latents.py", (
          f"--vae={w}/vae", f"--data_dir={data}/shapes", f"--out_dir={data}/latents")),
      Stage("dit", "sora_jax.train", (*conf, f"--workdir={w}/dit")),
      Stage("export", "sora_jax.export", (f"--workdir={w}", f"--out={w}/bundle")),
      Stage("samples", "sora_jax.sample", (
          f"--bundle={w}/bundle", f"--prompts_file={_ROOT}/experiments/demo_prompts.txt",
          f"--out={w}/samples/sample.mp4", "--also=gif")),
      Stage("evaluate", "sora_jax.evaluate", (f"--bundle={w}/bundle", f"--out_dir={w}/eval")),
  ]
  return out


def _duration(seconds: float) -> str:
  return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def expected_seconds(cfg, name: str) -> float:
  """The stage's time on an idle 2-core CPU from config.demo.expected_minutes (0: none given)."""
  stage = name.replace("-", "_")
  if "demo" not in cfg or stage not in cfg.demo.expected_minutes:
    return 0.0
  return 60.0 * float(cfg.demo.expected_minutes[stage] or 0.0)


def timing_lines(cfg, name: str, took: float) -> list[str]:
  """What the demo prints when stage `name` has taken `took` seconds."""
  expected = expected_seconds(cfg, name)
  if not expected:
    return [f"[demo] {name}: {_duration(took)}"]
  lines = [f"[demo] {name}: {_duration(took)}, expected about {_duration(expected)}"]
  if took > float(cfg.demo.slow_factor) * expected:
    lines.append(f"[demo] the {name} stage took {_duration(took)}; expected about {_duration(expected)} on "
                 f"an idle 2-core CPU: this machine ({os.cpu_count()} cores) is slower or busy")
  return lines


def stopped_early(cfg, name: str, w: str) -> str | None:
  """A line naming a trainer stage that ended before its configured steps (a wall-clock cap), else None:
  later stages then use a model trained less than the demo's recipe."""
  if name == "vae":
    path, total, cap = os.path.join(w, "vae", "final_metrics.json"), int(cfg.vae_train.total_steps), \
        "vae_train.max_train_seconds"
    if not os.path.isfile(path):
      return None
    with open(path) as f:
      step = int(json.load(f).get("step", total))
  elif name == "dit":
    from sora_jax import bundle  # pylint: disable=g-import-not-at-top
    steps = bundle.checkpoint_steps(os.path.join(w, "dit"))
    step, total, cap = (steps[-1] if steps else 0), int(cfg.train.total_steps), "train.max_train_seconds"
  else:
    return None
  if step >= total:
    return None
  return (f"[demo] warning: the {name} stage stopped at step {step} of {total} ({cap}); later stages use a "
          "model trained less than the demo's recipe")


def main(argv):
  del argv
  cfg = config_lib.get_config()
  cfg_arg = flags.FLAGS["config"].serialize().split("=", 1)[1]
  w = _WORKDIR.value
  os.makedirs(w, exist_ok=True)
  todo = stages(cfg_arg, cfg, w)
  unknown = set(_ONLY.value) - {s.name for s in todo}
  if unknown:
    config_lib._fail(f"--only {sorted(unknown)}: unknown stage; accepted: {[s.name for s in todo]}")
  for key in ("vae_train.max_train_seconds", "train.max_train_seconds"):
    cap = float(functools.reduce(lambda node, k: node[k], key.split("."), cfg))
    if cap > 0:
      print(f"[demo] note: config.{key}={cap:.0f} may stop training before its steps on a slow machine",
            flush=True)
  start = time.time()
  for stage in todo:
    if _ONLY.value and stage.name not in _ONLY.value:
      continue
    cmd = stage.command()
    print(f"[demo] {stage.name} ({time.time() - start:.0f}s): {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=os.getcwd())
    if rc != 0:
      print(f"[demo] stage {stage.name} failed with exit status {rc}; re-run `make demo` to resume",
            file=sys.stderr)
      sys.exit(rc)
    for line in timing_lines(cfg, stage.name, time.time() - t0) + [stopped_early(cfg, stage.name, w)]:
      if line:
        print(line, flush=True)
  total = time.time() - start
  expected = sum(expected_seconds(cfg, s.name) for s in todo if not _ONLY.value or s.name in _ONLY.value)
  print(f"[demo] finished in {_duration(total)}" + (f" (expected about {_duration(expected)})" if expected
                                                    else "") + f"; everything is under {w}/", flush=True)


if __name__ == "__main__":
  config_lib.run(main)
