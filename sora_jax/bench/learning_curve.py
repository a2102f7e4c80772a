"""A learning curve: the evaluator's scores of one DiT run at several of its checkpoints.

    python -m sora_jax.bench.learning_curve --workdir runs/demo --out_dir runs/demo/curve \\
        [--steps 325,650,1300,2600] [--num_prompts 64] [--vae_clips 32] [--denoise_clips 32] [--seed 0] \\
        [--sample_steps 30] [--guidance 4] [--config experiments/x.py]

W is laid out as `make demo` leaves it (bundle.WorkdirLayout: W/dit, W/vae, W/data). At each step the
DiT's EMA weights of that checkpoint are put together in memory (bundle.assemble, no export) with the
run's VAE (its newest checkpoint), tokenizer, latent statistics and config (found as export finds it:
--config, W/dit/config.json, W/config.json, else the demo's), and evaluated by
sora_jax.evaluate into E/step_<step>/ (its own report.html and metrics.json): the same prompts, seed
and VAE at every step. A step whose metrics.json already holds the same settings is read back instead of
evaluated again, so an interrupted curve resumes. Then:
- E/learning_curve.json: the rows (step; the DiT's training FLOPs and tokens up to it; colour, motion and
  persistence with 95% Wilson intervals, and motion on the straight-motion prompts alone; blobs per frame
  and the object-token errors with 95% bootstrap intervals; its report) and the settings;
- E/learning_curve.csv: the same rows, one column per number;
- E/learning_curve.png: three panels against the step (logarithmic): the detector's rates, blobs per frame
  (the ground truth's dashed), the object-token errors;
- E/report.html: the plot and the table. `python -m sora_jax.evaluate --out_dir E ...` (or with
  --learning_curve E/learning_curve.json) shows them in a bundle's report too.

Which steps exist: a run keeps a checkpoint every `train.checkpoint_every_steps` and only its newest
`train.keep_checkpoints` (experiments/shapes_demo.py: 100 and 3, so a finished demo run holds its last three
hundreds). For a curve at 325, 650, 1300 and 2600 train with --config.train.checkpoint_every_steps=325
--config.train.keep_checkpoints=8. A requested step that is not on disk fails with one line listing the steps
that are; without --steps every step on disk is evaluated.

Training compute comes from W/dit/metrics.jsonl: `compile/model_tflops_per_step` (flops.py's hand count of
the step's model FLOPs, logged at each start or resume) times the steps run since, and the tokens per
step (`tokens_per_s` x `step_time_s` of each log line) summed; absent (null) when the run did not log them.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from absl import flags
from absl import logging

from sora_jax import bundle as bundle_lib
from sora_jax import config as config_lib
from sora_jax import detector
from sora_jax import evaluate
from sora_jax import report


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "the run: W/dit (checkpoints), W/vae, W/data as `make demo` lays out")
  flags.DEFINE_string("out_dir", None, "where learning_curve.{json,csv,png}, report.html and step_<s>/ go")
  flags.DEFINE_list("steps", [], "checkpoint steps to evaluate (default: every step on disk)")
  flags.DEFINE_integer("num_prompts", None, "Shapes test prompts to generate and score at each step")
  flags.DEFINE_integer("vae_clips", None, "held-out Shapes clips for the VAE's metrics")
  flags.DEFINE_integer("denoise_clips", None, "Shapes test clips for the DiT's object-token error")
  flags.DEFINE_integer("seed", None, "sampling seed (and data set seed of the prompts)")
  flags.DEFINE_integer("sample_steps", None, "sampler steps (default: the config's sample.steps)")
  flags.DEFINE_float("guidance", None, "CFG scale (default: the config's sample.guidance)")


# ------------------------------------------------------------------------------------ training compute
def train_compute(records: Sequence[dict], step: int) -> dict:
  """{"train_flops", "train_tokens"} of the DiT up to `step` from its metrics.jsonl records (merged per
  step, as metrics.read_metrics gives them); None where the run did not log what they need."""
  starts = [(r["step"], r["compile/model_tflops_per_step"]) for r in records
            if isinstance(r.get("compile/model_tflops_per_step"), (int, float))]
  flops = None
  if starts:
    ends = [s for s, _ in starts[1:]] + [math.inf]
    flops = sum(max(0, min(end, step) - s0) * tflops * 1e12 for (s0, tflops), end in zip(starts, ends))
  tokens, prev = None, 0
  for r in records:
    # A start (or resume) opens a new interval: the first log line after it covers the steps since.
    prev = max([prev] + [s for s, _ in starts if s < r["step"]])
    if isinstance(r.get("tokens_per_s"), (int, float)) and isinstance(r.get("step_time_s"), (int, float)):
      covered = max(0, min(r["step"], step) - prev)
      tokens = (tokens or 0.0) + r["tokens_per_s"] * r["step_time_s"] * covered
      prev = r["step"]
  return {"train_flops": flops, "train_tokens": tokens}


# ---------------------------------------------------------------------------------------------- rows
def curve_row(step: int, result: dict, compute: dict, out_dir: str) -> dict:
  """One step's row of learning_curve.json from its evaluation result."""
  groups = (result.get("generation") or {}).get("groups") or {}
  errors = (result.get("object_token_error") or {}).get("by_t", {})
  return {"step": int(step), **compute,
          **{name: groups.get(g, {}).get(m) for name, (g, m, _) in evaluate.CURVE_RATES.items()},
          "blobs_per_frame": (result.get("blobs_per_frame") or {}).get("generated"),
          "object_token_error": {t: v["object"] for t, v in errors.items()},
          "direction_reading": ((result.get("caption_reading") or {}).get("direction") or {}),
          "report": os.path.relpath(result["report"], out_dir) if result.get("report") else None}


def csv_rows(curve: dict) -> list[dict]:
  """learning_curve.json's rows flattened to one number per column."""
  out = []
  for r in curve["rows"]:
    row = {"step": r["step"], "train_flops": r.get("train_flops"), "train_tokens": r.get("train_tokens")}
    for m in evaluate.CURVE_RATES:
      rate = r.get(m) or {}
      lo, hi = rate.get("ci95", [None, None])
      row.update({m: rate.get("rate"), f"{m}_lo": lo, f"{m}_hi": hi, f"{m}_n": rate.get("n")})
    named = [("blobs_per_frame", r.get("blobs_per_frame"))]
    named += [(f"object_token_error_t{t}", v) for t, v in r.get("object_token_error", {}).items()]
    named += [(f"direction_reading_t{t}", v) for t, v in r.get("direction_reading", {}).items()]
    for name, m in named:
      m = m or {}
      lo, hi = m.get("ci95", [None, None])
      row.update({name: m.get("mean", m.get("increase")), f"{name}_lo": lo, f"{name}_hi": hi,
                  f"{name}_n": m.get("n")})
    out.append(row)
  return out


def plot(curve: dict, path: str) -> str:
  """learning_curve.png: rates, blobs per frame and object-token errors against the step."""
  def points(get):
    pts = []
    for r in curve["rows"]:
      m = get(r) or {}
      y = m.get("rate", m.get("mean", m.get("increase")))
      if y is not None:
        pts.append((r["step"], y, *m.get("ci95", [None, None])))
    return pts
  truth = (curve.get("blobs_ground_truth") or {}).get("mean")
  panels = [
      {"title": "detector (all prompts)", "y_range": (0.0, 1.0),
       "series": {label: points(lambda r, m=m: r.get(m))
                  for m, (_, _, label) in evaluate.CURVE_RATES.items()}},
      {"title": "blobs per frame, one-object prompts", "refs": {"ground truth": truth},
       "series": {"generated": points(lambda r: r.get("blobs_per_frame"))}},
      {"title": "DiT object-token error", "series": {
          f"t={t:g}": points(lambda r, t=t: r.get("object_token_error", {}).get(f"{t:g}"))
          for t in curve["times"]}},
      {"title": "object-token error's increase, direction word swapped", "refs": {"not read": 0.0},
       "series": {f"t={t:g}": points(lambda r, t=t: r.get("direction_reading", {}).get(f"{t:g}"))
                  for t in curve["times"]}},
  ]
  return report.panels_png(path, panels, x_label="DiT training step (log scale)",
                           log_x=all(r["step"] > 0 for r in curve["rows"]))


def write(curve: dict, out_dir: str) -> dict:
  """Writes learning_curve.{json,csv,png} and report.html to out_dir; returns their paths."""
  paths = {k: os.path.join(out_dir, f"learning_curve.{k}") for k in ("json", "csv", "png")}
  with open(paths["json"], "w") as f:
    json.dump(curve, f, indent=2)
  rows = csv_rows(curve)
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
  plot(curve, paths["png"])
  links = "".join(f"<li><a href='{r['report']}'>step {r['step']}</a></li>" for r in curve["rows"] if r["report"])
  settings = report.kv_table([(k, str(v)) for k, v in curve["settings"].items()])
  paths["html"] = report.write_html(
      os.path.join(out_dir, "report.html"), title="sora-jax learning curve",
      headline=[("run", curve["workdir"]), ("steps", ", ".join(str(r["step"]) for r in curve["rows"]))],
      sections=[("Learning curve", evaluate.learning_curve_html(curve, "learning_curve.png")),
                ("Each step's evaluation", f"<ul>{links}</ul>"), ("Settings", settings)])
  return paths


# ---------------------------------------------------------------------------------------------- driver
def _reuse(path: str, step: int, settings: dict) -> dict | None:
  """A finished evaluation of this step with these settings, or None."""
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    done = json.load(f)
  same = done.get("settings") == settings and (done.get("bundle_source") or {}).get("dit_step") == step
  return {**done, "report": os.path.join(os.path.dirname(path), "report.html")} if same else None


def learning_curve(workdir: str, out_dir: str, *, checkpoint_steps: Sequence[int] | None = None, cfg=None,
                   generate: Callable | None = None, **overrides) -> dict:
  """Evaluates the DiT's EMA weights at each of `checkpoint_steps` (default: all on disk) and writes the
  curve.

  `overrides` are evaluate's settings (num_prompts, vae_clips, denoise_clips, seed, steps (the sampler's),
  guidance, ...); `generate` replaces sampling.generate (tests). Raises bundle.BundleError (one line)
  when a step is not on disk.
  """
  from sora_jax import export  # pylint: disable=g-import-not-at-top
  layout = bundle_lib.WorkdirLayout(Path(workdir))
  on_disk = bundle_lib.checkpoint_steps(layout.dit)
  if not on_disk:
    raise bundle_lib.BundleError(f"{layout.dit} holds no finished checkpoint (train the DiT first)")
  steps = sorted(set(int(s) for s in checkpoint_steps)) if checkpoint_steps else on_disk
  missing = [s for s in steps if s not in on_disk]
  if missing:
    raise bundle_lib.BundleError(f"{layout.dit} has no checkpoint at step(s) {missing}; it has steps "
                                 f"{on_disk} (a run keeps its newest train.keep_checkpoints, every "
                                 "train.checkpoint_every_steps)")
  if cfg is None and layout.config_file() is None:
    cfg = export.demo_config(workdir)
  cfg, _, vae, stats, tok, source = bundle_lib.read_workdir(workdir, cfg)
  settings = evaluate.settings(cfg, **overrides)
  metrics_path = layout.dit / "metrics.jsonl"
  if metrics_path.is_file():
    from sora_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    records = metrics_lib.read_metrics(str(metrics_path))
  else:
    records = []
  os.makedirs(out_dir, exist_ok=True)
  rows, truth = [], None
  for step in steps:
    step_dir = os.path.join(out_dir, f"step_{step}")
    result = _reuse(os.path.join(step_dir, "metrics.json"), step, settings)
    if result is None:
      dit, _, key = bundle_lib.restore_ema(layout.dit, step)
      b = bundle_lib.assemble(cfg, dit, vae, tok, stats, path=f"{workdir} (DiT step {step})",
                              manifest={"source": {**source, "dit_step": step, "dit_weights": key}})
      print(f"[curve] step {step}: evaluating into {step_dir}", flush=True)
      result = evaluate.evaluate(b, step_dir, workdir=workdir, generate=generate, **overrides)
    else:
      print(f"[curve] step {step}: {step_dir}/metrics.json has these settings; read back", flush=True)
    rows.append(curve_row(step, result, train_compute(records, step), out_dir))
    truth = truth or (result.get("blobs_per_frame") or {}).get("ground_truth")
    print(f"[curve] step {step}: " + "; ".join(
        f"{m} {detector.Rate(r['k'], r['n'])}" for m in evaluate.CURVE_RATES if (r := rows[-1][m])), flush=True)
  curve = {"workdir": str(Path(workdir).absolute()), "settings": settings, "times": list(evaluate.DENOISE_TIMES),
           "blobs_ground_truth": truth, "rows": rows}
  curve["files"] = write(curve, out_dir)
  return curve


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every read and write at INFO
  if not flags.FLAGS.workdir or not flags.FLAGS.out_dir:
    config_lib._fail("--workdir and --out_dir are required")  # pylint: disable=protected-access
  f = flags.FLAGS
  try:
    steps = [int(s) for s in f.steps]
  except ValueError:
    config_lib._fail(  # pylint: disable=protected-access
        f"--steps {','.join(f.steps)}: give checkpoint steps as integers, e.g. 325,650,1300")
  overrides = dict(num_prompts=f.num_prompts, vae_clips=f.vae_clips, denoise_clips=f.denoise_clips,
                   seed=f.seed, steps=f.sample_steps, guidance=f.guidance)
  cfg = config_lib.get_config() if f["config"].present else None
  try:
    curve = learning_curve(f.workdir, f.out_dir, checkpoint_steps=steps, cfg=cfg, **overrides)
  except (bundle_lib.BundleError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"[curve] {len(curve['rows'])} steps; plot {curve['files']['png']}; report "
        f"{os.path.abspath(curve['files']['html'])}", flush=True)


if __name__ == "__main__":
  define_flags()
  config_lib.run(main)
