"""`make demo`: every stage of sora-jax, end to end, on the embedded Shapes data set.

    python -m sora_jax.demo --config experiments/shapes_demo.py --workdir runs/demo

Stages run in order as separate processes, exactly as a user would run them by hand (each stage's command
is printed first); each one resumes or skips finished work, so re-running the demo after an interruption
continues where it stopped. Layout of the work directory:

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
import os
import shlex
import subprocess
import sys
import time

from absl import flags

from sora_jax import config as config_lib

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "where every stage writes")
_ONLY = flags.DEFINE_list("only", [], "run just these stages (names as printed)")

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
  paths = (f"--config.data.shapes_dir={data}/shapes", f"--config.data.latents_dir={data}/latents",
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
  start = time.time()
  for stage in todo:
    if _ONLY.value and stage.name not in _ONLY.value:
      continue
    cmd = stage.command()
    print(f"[demo] {stage.name} ({time.time() - start:.0f}s): {shlex.join(cmd)}", flush=True)
    rc = subprocess.call(cmd, cwd=os.getcwd())
    if rc != 0:
      print(f"[demo] stage {stage.name} failed with exit status {rc}; re-run `make demo` to resume",
            file=sys.stderr)
      sys.exit(rc)
  print(f"[demo] finished in {time.time() - start:.0f}s; everything is under {w}/", flush=True)


if __name__ == "__main__":
  config_lib.run(main)
