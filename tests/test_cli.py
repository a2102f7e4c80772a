"""Command lines as a new user meets them: `--help` lists each command's own flags, and numeric flags
refuse values outside their range with one line (exit 2) before any work starts.

Every command runs as a subprocess, all of them at once (each is mostly Python start-up).
"""
import os
from pathlib import Path
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  return env


def _run_all(commands: dict[str, list[str]], timeout: float = 240) -> dict[str, subprocess.CompletedProcess]:
  procs = {k: subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for k, cmd in commands.items()}
  out = {}
  for k, p in procs.items():
    stdout, stderr = p.communicate(timeout=timeout)
    out[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
  return out


_OWN_FLAGS = {
    "sora_jax.train": ["--config", "--workdir"],
    "sora_jax.train_vae": ["--config", "--workdir"],
    "sora_jax.sample": ["--bundle", "--workdir", "--prompt", "--prompts_file", "--num_frames", "--steps",
                        "--guidance", "--out", "--image", "--noise"],
    "sora_jax.reconstruct": ["--vae", "--input", "--out", "--max_tile_pixels", "--fps"],
    "sora_jax.export": ["--workdir", "--out", "--dtype"],
    "sora_jax.evaluate": ["--bundle", "--out_dir", "--num_prompts"],
    "sora_jax.demo": ["--config", "--workdir", "--only"],
    "data_pipelines/ingest_videos.py": ["--input", "--out_dir", "--split"],
    "data_pipelines/encode_latents.py": ["--vae", "--data_dir", "--out_dir", "--shard_size"],
    "data_pipelines/train_tokenizer.py": ["--data_dir", "--out", "--vocab_size"],
}


def _argv(target: str) -> list[str]:
  return [target] if target.endswith(".py") else ["-m", target]


def test_help_lists_each_commands_own_flags():
  done = _run_all({t: [*_argv(t), "--help"] for t in _OWN_FLAGS})
  for target, wanted in _OWN_FLAGS.items():
    p = done[target]  # absl's --help exits 1
    listed = {line.split(":")[0].strip() for line in p.stdout.splitlines() if line.startswith("  --")}
    missing = [f for f in wanted if f not in listed]
    assert not missing, f"{target} --help does not list {missing}; it lists {sorted(listed)}"


# (command, a bad value, words the one line must hold)
_BAD_NUMBERS = {
    "evaluate num_prompts": (["-m", "sora_jax.evaluate", "--bundle=b", "--out_dir=o", "--num_prompts=-5"],
                             "--num_prompts=-5"),
    "evaluate zero clips": (["-m", "sora_jax.evaluate", "--bundle=b", "--out_dir=o", "--vae_clips=0"],
                            "--vae_clips=0"),
    "evaluate steps": (["-m", "sora_jax.evaluate", "--bundle=b", "--out_dir=o", "--steps=0"], "--steps=0"),
    "evaluate guidance": (["-m", "sora_jax.evaluate", "--bundle=b", "--out_dir=o", "--guidance=-1"],
                          "--guidance=-1"),
    "sample steps": (["-m", "sora_jax.sample", "--bundle=b", "--prompt=a", "--steps=0"], "--steps=0"),
    "sample height": (["-m", "sora_jax.sample", "--bundle=b", "--prompt=a", "--height=-32"], "--height=-32"),
    "sample seed": (["-m", "sora_jax.sample", "--bundle=b", "--prompt=a", "--seed=-1"], "--seed=-1"),
    "sample strength": (["-m", "sora_jax.sample", "--bundle=b", "--prompt=a", "--strength=1.5"],
                        "--strength=1.5"),
    "reconstruct tiles": (["-m", "sora_jax.reconstruct", "--vae=v", "--input=i.mp4", "--out=o.mp4",
                           "--max_tile_pixels=-1"], "--max_tile_pixels=-1"),
    "encode_latents shards": (["data_pipelines/encode_latents.py", "--vae=v", "--data_dir=d", "--out_dir=o",
                               "--shard_size=0"], "--shard_size=0"),
    "train_tokenizer vocab": (["data_pipelines/train_tokenizer.py", "--data_dir=d", "--out=t.model",
                               "--vocab_size=0"], "--vocab_size=0"),
    "build_shapes seed": (["data_pipelines/build_shapes.py", "--out_dir=d", "--split=train",
                           "--num_examples=2", "--seed=-3"], "--seed=-3"),
    "ingest workers": (["data_pipelines/ingest_videos.py", "--input=i", "--out_dir=d", "--num_workers=-1"],
                       "--num_workers=-1"),
}


def test_numeric_flags_refuse_bad_values_with_one_line(tmp_path):
  done = _run_all({k: cmd for k, (cmd, _) in _BAD_NUMBERS.items()})
  for name, (_, named) in _BAD_NUMBERS.items():
    p = done[name]
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2, (name, p.returncode, p.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], (name, p.stderr)


def test_missing_latents_or_workdir_is_one_line_naming_it(tmp_path):
  done = _run_all({
      "train": ["-m", "sora_jax.train", "--config=experiments/shapes_demo.py", f"--workdir={tmp_path}/dit",
                f"--config.data.latents_dir={tmp_path}/latents", f"--config.data.tokenizer={tmp_path}/t.model"],
      "export": ["-m", "sora_jax.export", f"--workdir={tmp_path}/missing", f"--out={tmp_path}/bundle"],
  })
  named = {"train": f"{tmp_path}/latents/latent_stats.json is missing",
           "export": f"--workdir {tmp_path}/missing does not exist"}
  for name, p in done.items():
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and named[name] in lines[0], (name, p.stderr[-3000:])


def test_sample_prints_its_results_not_orbax_logs(tmp_path):
  """A run's checkpoints read by orbax: its INFO lines and "Metadata file does not exist" warnings
  (some 40 lines per load) stay out of the output; the command's own lines remain."""
  sys.path.insert(0, str(ROOT / "tests"))
  import test_export  # pylint: disable=import-outside-toplevel
  w = test_export.make_workdir(tmp_path / "w")["workdir"]
  p = _run_all({"sample": ["-m", "sora_jax.sample", f"--workdir={w}", "--prompt=a red circle", "--steps=1",
                           "--num_frames=1", "--height=16", "--width=16", f"--out={tmp_path}/s.png"]})["sample"]
  assert p.returncode == 0, p.stderr[-3000:]
  assert "wrote" in p.stdout and "loaded in" in p.stdout
  noise = [l for l in (p.stdout + p.stderr).splitlines()
           if "orbax" in l or "Metadata file" in l or l.startswith(("I1", "I0", "W1", "W0"))]
  assert not noise, noise[:5]
