"""Faults and bad input (docs/faults.md): nothing is lost, every mistake is one line, nothing hangs.

One test per case of docs/faults.md's table, in its order: data loss first, then hangs, restore
fallbacks and the one-line errors of each command.
"""
import errno
import json
import os
import re
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from sora_jax.data import sources
from test_sample_cli import bundle_dir, cli, pipe  # pylint: disable=unused-import  # fixtures

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
  """The environment of a command run as a subprocess: this checkout's sora_jax, 1 CPU device."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
  return env


def _snapshot(root: Path) -> dict:
  """Every file under `root` with its bytes: equal snapshots are equal byte for byte."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _clips(n, seed):
  rng = np.random.default_rng(seed)
  for i in range(n):
    video = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    yield {"video": video, "caption": f"clip {i}", "num_frames": 5, "height": 16, "width": 16,
           "fps": 8.0, "labels": "", "source": f"test/{seed}/{i}"}


# ------------------------------------------------------------------------------------------ data loss
@pytest.mark.parametrize("fault", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_interrupted_rewrite_keeps_the_previous_split(tmp_path, fault):
  sources.write_dataset(tmp_path, name="videos", split="train", features=sources.video_features(),
                        examples=_clips(3, 0))
  before = _snapshot(tmp_path)

  def interrupted():
    yield from _clips(2, 1)
    raise fault

  with pytest.raises(type(fault)):
    sources.write_dataset(tmp_path, name="videos", split="train", features=sources.video_features(),
                          examples=interrupted())
  assert _snapshot(tmp_path) == before
  assert [r["source"] for r in sources.video_source(tmp_path, "train")] == [f"test/0/{i}" for i in range(3)]
  # A complete rebuild then replaces it, and leaves nothing else behind.
  sources.write_dataset(tmp_path, name="videos", split="train", features=sources.video_features(),
                        examples=_clips(2, 1))
  assert [r["source"] for r in sources.video_source(tmp_path, "train")] == ["test/1/0", "test/1/1"]
  assert sorted(p.name for p in (tmp_path / "videos" / "train").iterdir()) == [sources.VERSION]


def _ingest(folder: Path, out: Path) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / "data_pipelines" / "ingest_videos.py"),
                         f"--input={folder}", f"--out_dir={out}", "--num_workers=0"],
                        capture_output=True, text=True, timeout=300, env=_env())


def test_all_bad_reingest_keeps_the_previous_split(tmp_path):
  from sora_jax import video_io
  good, bad, out = tmp_path / "good", tmp_path / "bad", tmp_path / "out"
  good.mkdir()
  bad.mkdir()
  video_io.write_video(good / "a.mp4", np.zeros((9, 32, 32, 3), np.uint8), 8)
  (good / "captions.jsonl").write_text(json.dumps({"file": "a.mp4", "caption": "black"}) + "\n")
  (bad / "x.mp4").write_bytes(b"not a video")
  (bad / "captions.jsonl").write_text(json.dumps({"file": "x.mp4", "caption": "c"}) + "\n")
  assert _ingest(good, out).returncode == 0
  split_dir = out / "videos" / "train"
  before = _snapshot(split_dir)
  proc = _ingest(bad, out)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert _snapshot(split_dir) == before
  assert "kept" in proc.stdout and str(split_dir / sources.VERSION) in proc.stdout, proc.stdout
  report = json.loads((out / "ingest_report.json").read_text())
  assert report["num_files"] == 0 and report["kept"] == str(split_dir / sources.VERSION)


def test_a_swap_killed_between_its_renames_is_undone(tmp_path):
  from sora_jax import atomic
  out, new = tmp_path / "out", tmp_path / "new"
  out.mkdir()
  (out / "f").write_text("old")
  os.rename(out, tmp_path / ("out" + atomic.PREVIOUS))  # killed here: only the old one, set aside
  new.mkdir()
  (new / "f").write_text("new")
  atomic.recover_dir(out)
  assert (out / "f").read_text() == "old"
  atomic.replace_dir(new, out)
  assert (out / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _vae_checkpoints(workdir: Path) -> dict:
  """{step: (params, ema)} of every checkpoint a VAE run left."""
  from sora_jax import bundle
  out = {}
  for d in sorted((workdir / "checkpoints").iterdir()):
    if d.name.isdigit():
      state = bundle._restore_tree(d / "state")  # pylint: disable=protected-access
      out[int(d.name)] = (state["params"], state["ema"])
  return out


_VAE_RUN = r"""
import json, sys
import test_train_vae
from sora_jax import train_vae
cfg = test_train_vae.set_keys(test_train_vae._tiny_config(sys.argv[1]), json.loads(sys.argv[3]))
try:
  train_vae.train(cfg, sys.argv[2])
except train_vae.NonFiniteLoss as e:
  print(f"error: {e}", file=sys.stderr)
  sys.exit(3)
"""


def _vae_run(shapes_videos, workdir, **overrides) -> list:
  """The command that trains the tiny VAE of test_train_vae in its own process, on one CPU device."""
  return [sys.executable, "-c", _VAE_RUN, str(shapes_videos), str(workdir), json.dumps(overrides)]


@pytest.mark.slow  # about 35 s: one VAE compile
def test_diverging_vae_run_leaves_only_finite_checkpoints(shapes_videos, tmp_path):
  """lr 3 (no warmup, no clipping) overflows the tiny VAE at its second step; checkpoints every step."""
  import jax
  proc = subprocess.run(_vae_run(shapes_videos, tmp_path, **{
      "vae_train.total_steps": 5, "vae_train.log_every_steps": 100, "vae_train.checkpoint_every_steps": 1,
      "vae_train.keep_checkpoints": 5, "vae_train.optim.lr": 3.0, "vae_train.optim.warmup_steps": 0,
      "vae_train.optim.schedule": "constant", "vae_train.optim.grad_clip": 0.0}),
      capture_output=True, text=True, timeout=600, env=_env())
  saved = _vae_checkpoints(tmp_path)
  for step, trees in saved.items():
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(trees)), step
  assert proc.returncode == 3, proc.stderr[-3000:]
  line = proc.stderr.strip().splitlines()[-1]
  bad = int(re.search(r"non-finite .* at step (\d+);", line).group(1))
  assert bad >= 2 and sorted(saved) == list(range(1, bad)), (line, sorted(saved))


def _tiny_vae_flags(shapes_videos, workdir, **overrides) -> list:
  """`python -m sora_jax.train_vae` of test_train_vae's tiny VAE (its TINY_VAE keys as flags), on one CPU
  device."""
  import test_train_vae
  values = {**test_train_vae.TINY_VAE, "data.videos_dir": str(shapes_videos), **overrides}
  return ([sys.executable, "-m", "sora_jax.train_vae", f"--config={ROOT / 'experiments' / 'shapes_demo.py'}",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in values.items()])


def _wait_for_line(proc, pattern: str, timeout: float = 600) -> list[str]:
  """Lines of `proc`'s stdout up to the first matching `pattern` (the process keeps running)."""
  import time
  lines, t0 = [], time.time()
  for line in proc.stdout:
    lines.append(line)
    if re.search(pattern, line):
      return lines
    assert time.time() - t0 < timeout, "".join(lines)
  raise AssertionError(f"{pattern!r} never printed; exit {proc.wait()}:\n" + "".join(lines))


@pytest.mark.slow  # about 45 s: one VAE compile
def test_sigterm_to_train_vae_saves_and_exits_cleanly(shapes_videos, tmp_path):
  import signal
  proc = subprocess.Popen(_tiny_vae_flags(shapes_videos, tmp_path, **{
      "vae_train.total_steps": 100_000, "vae_train.log_every_steps": 1,
      "vae_train.checkpoint_every_steps": 100_000}), env=_env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, cwd=ROOT)
  try:
    _wait_for_line(proc, r"\[vae\] step 2/")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
  finally:
    proc.kill()
  assert proc.returncode == 0, out[-3000:]
  saved = int(re.search(r"SIGTERM: saved step (\d+); exiting", out).group(1))
  assert saved >= 2 and sorted(_vae_checkpoints(tmp_path)) == [saved]


# ------------------------------------------------------------------------------------------ no hangs
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from sora_jax.data import shapes
  from sora_jax.data.tokenizer import train_tokenizer
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  captions = [shapes.caption(shapes.sample_spec("train", i, 0, "demo")) for i in range(50)]
  train_tokenizer(captions, str(path), 64)
  return path


def _train_flags(workdir, shapes_videos, tokenizer, *flags) -> list:
  """`python -m sora_jax.train` on the Shapes stand-in data (no VAE), with extra flags."""
  return [sys.executable, "-m", "sora_jax.train", f"--config={ROOT / 'experiments' / 'shapes_demo.py'}",
          f"--workdir={workdir}", "--config.data.source=shapes", f"--config.data.videos_dir={shapes_videos}",
          f"--config.data.tokenizer={tokenizer}", "--config.data.vocab_size=64", *flags]


def _one_line_error(proc, *names):
  """The command failed with exit 2 and one stderr line that starts with error: and names `names`."""
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
  assert lines[0].startswith("error: ") and all(n in lines[0] for n in names), lines[0]
  return lines[0]


def test_a_row_smaller_than_any_sample_is_refused_not_waited_on(shapes_videos, tokenizer, tmp_path):
  proc = subprocess.run(_train_flags(tmp_path, shapes_videos, tokenizer, "--config.data.seq_len=2",
                                     "--config.data.token_budget=0"),
                        capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
  _one_line_error(proc, "config.data.seq_len=2", "at least 4")


def test_a_stream_that_drops_every_sample_raises_instead_of_waiting():
  from sora_jax.config import ConfigError
  from sora_jax.data import pipeline
  from test_pipeline import LatentRecords, make_config, tokenize
  cfg = make_config("", long_clips="drop", seq_len=6, min_patch_side=2)
  records = LatentRecords([(2, 8, 8)] * 5)  # 2 frames of 2x2 patches at the smallest: 8 tokens > 6
  it = pipeline.make_iterator(cfg, source=records, tokenize=tokenize, stats=(np.zeros(4), np.ones(4)))
  with pytest.raises(ConfigError, match="all of the last 10 samples were dropped.*token_budget=6"):
    next(it)


def _start_tiny_train(workdir, **overrides):
  return subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_fixtures.py"), str(workdir),
                           json.dumps(overrides)], env=dict(_env(), XLA_FLAGS=os.environ["XLA_FLAGS"]),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_while_waiting_for_the_first_batch_exits(tmp_path):
  import signal
  import time
  proc = _start_tiny_train(tmp_path, stall_at=0)
  try:
    _wait_for_line(proc, r"start: scratch")
    time.sleep(1.0)  # into the wait for a batch that never comes
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
  finally:
    proc.kill()
  assert proc.returncode == 0 and "SIGTERM while waiting for the first batch; exiting" in out, out[-3000:]


@pytest.mark.slow  # about 40 s: one DiT compile
def test_sigterm_while_waiting_for_data_saves_and_exits(tmp_path):
  import signal
  import time
  proc = _start_tiny_train(tmp_path, stall_at=3, **{"train.total_steps": 100, "train.checkpoint_every_steps": 100,
                                                    "train.log_every_steps": 1})
  try:
    _wait_for_line(proc, r"compiled in")
    while not (tmp_path / "metrics.jsonl").exists() or '"step": 3' not in (
        tmp_path / "metrics.jsonl").read_text():
      assert proc.poll() is None, proc.stdout.read()
    time.sleep(3.0)  # past step 3's bookkeeping, into the wait for batch 4
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
  finally:
    proc.kill()
  assert proc.returncode == 0 and "SIGTERM while waiting for data: saved step 3; exiting" in out, out[-3000:]
  position = (tmp_path / "checkpoints" / "3" / "data_iter" / "process_0-of-1.json").read_text()
  assert json.loads(position) == {"json": {"index": 3}}, position  # resumes with the batch it waited for


def test_a_video_larger_than_the_model_takes_is_refused_before_sampling(cli, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli("--prompt=x", "--num_frames=5", "--height=10000", "--width=16", f"--out={tmp_path / 'x.mp4'}")
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1, err
  assert "5x10000x16" in err and "5000 tokens" in err and "at most 64" in err, err
  assert not list(tmp_path.iterdir())


def test_a_decode_beyond_this_machines_memory_is_refused(pipe):
  from sora_jax import sampling
  sampling.check_size(pipe, 5, 32, 32, memory=(2**30, "test memory"))
  with pytest.raises(ValueError, match=r"5x32x32 needs about .* GiB to decode; the limit here is half the "
                                       r"0\.0 GiB of test memory"):
    sampling.check_size(pipe, 5, 32, 32, memory=(2**20, "test memory"))


# ------------------------------------------------------------------------------- restore falls back
def _damage(kind: str, step_dir: Path) -> None:
  """What a half-finished delete, a truncating copy or a broken disk leaves of a finished checkpoint."""
  import shutil
  state = step_dir / "state"
  data = sorted((state / "ocdbt.process_0" / "d").iterdir())
  if kind == "files deleted":
    for f in data:
      f.unlink()
  elif kind == "state deleted":
    shutil.rmtree(state)
  elif kind == "truncated":
    for f in data:
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  elif kind == "unreadable":  # as root, chmod cannot make a file unreadable; a directory in its place is
    for f in data:
      f.unlink()
      f.mkdir()


DAMAGE = ["files deleted", "state deleted", "truncated", "unreadable"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_newest_checkpoint_is_named_and_an_older_one_restored(tmp_path, kind, caplog):
  import jax
  import jax.numpy as jnp
  from sora_jax import checkpoint
  tree = lambda s: {"w": jnp.arange(1000.0) + s, "b": {"x": jnp.full(3, float(s))}}
  mgr = checkpoint.Manager(str(tmp_path))
  for step in (2, 4):
    mgr.save(step, tree(step), force=True)
  mgr.close()
  _damage(kind, tmp_path / "4")
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree(0))
  mgr = checkpoint.Manager(str(tmp_path))
  step, state = mgr.restore_newest(abstract)
  assert step == 2 and float(state["b"]["x"][0]) == 2.0
  warning = [r.getMessage() for r in caplog.records if "is unusable" in r.getMessage()]
  assert len(warning) == 1 and f"checkpoint {tmp_path / '4'} is unusable (" in warning[0], warning
  # Set aside, so the resumed run saves step 4 again.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4.unusable"] and mgr.all_steps() == [2]
  assert mgr.save(4, tree(4), force=True)
  mgr.close()


def test_a_config_that_fits_no_checkpoint_sets_nothing_aside(tmp_path):
  import jax
  import jax.numpy as jnp
  from sora_jax import checkpoint
  mgr = checkpoint.Manager(str(tmp_path))
  for step in (2, 4):
    mgr.save(step, {"w": jnp.zeros(4)}, force=True)
  mgr.close()
  mgr = checkpoint.Manager(str(tmp_path))
  with pytest.raises(checkpoint.Unrestorable, match=f"no checkpoint in {tmp_path} restores: {tmp_path / '4'}: "):
    mgr.restore_newest({"w": jax.ShapeDtypeStruct((5,), jnp.float32)})
  mgr.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4"]


def test_export_falls_back_from_a_damaged_newest_checkpoint(tmp_path, caplog):
  import shutil
  from sora_jax import bundle as bundle_lib
  from sora_jax import export
  from test_export import make_workdir
  info = make_workdir(tmp_path / "run")
  ckpts = Path(info["workdir"]) / "dit" / "checkpoints"
  shutil.copytree(ckpts / "7", ckpts / "9")
  # Step 9 is a copy of 7: halved files may still hold every byte export reads (the EMA alone), so the
  # damage here is deleted data files; truncation is covered by the trainer's restore test above.
  _damage("files deleted", ckpts / "9")
  manifest = export.export(info["workdir"], str(tmp_path / "bundle"))
  assert manifest["source"]["dit_step"] == 7
  assert any(f"checkpoint {ckpts / '9'} is unusable (" in r.getMessage() for r in caplog.records)
  assert sorted(p.name for p in ckpts.iterdir()) == ["7", "9"]  # export never moves a run's files
  loaded = bundle_lib.load(tmp_path / "bundle")
  assert loaded.manifest["source"]["dit_step"] == 7


@pytest.mark.slow  # about 90 s: two DiT compiles
def test_dit_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(tmp_path, caplog):
  """Checkpoints at 2 and 4; files of 4 deleted; the rerun resumes from 2 and its loss at step 4 is the
  uninterrupted run's, bit for bit (step-folded rngs, restored data position)."""
  import jax
  from sora_jax import train
  import train_fixtures as tf
  cfg = tf.tiny_config(**{"train.total_steps": 4, "train.checkpoint_every_steps": 2, "train.log_every_steps": 1})
  cfg.mesh.data = cfg.mesh.fsdp = cfg.mesh.tensor = 1
  run = lambda: train.train(cfg, str(tmp_path), data=(tf.SyntheticBatches(cfg), tf.to_global),
                            devices=jax.devices()[:1])
  run()
  _damage("files deleted", tmp_path / "checkpoints" / "4")
  run()
  assert any(f"checkpoint {tmp_path / 'checkpoints' / '4'} is unusable (" in r.getMessage()
             for r in caplog.records)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"loss"' in l]
  first, second = [r for r in rows if r["step"] == 4]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4] and first["loss"] == second["loss"]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4", "4.unusable"]


# ---------------------------------------------------------------------------- one line, not a traceback
@pytest.fixture
def command(capsys, monkeypatch):
  """Runs an entry point's main() as its command line would, in this process (8 fake devices):
  returns (exit code, stderr)."""
  from absl import flags
  from sora_jax import config as config_lib

  def run(module, *args):
    config_lib._define_config_flag()  # pylint: disable=protected-access
    flags.FLAGS.unparse_flags()
    argv = [module.__name__, *args]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # an earlier run's overrides
      delattr(flags.FLAGS, name)
    try:
      config_lib._parse_flags(argv)  # pylint: disable=protected-access
      module.main(argv[:1])
      code = 0
    except SystemExit as e:
      code = e.code
    return code, capsys.readouterr().err
  yield run
  flags.FLAGS.unparse_flags()


DEMO = f"--config={ROOT / 'experiments' / 'shapes_demo.py'}"


@pytest.mark.parametrize("flag,named", [
    ("--config.dit.remat=bogus", "config.dit.remat='bogus'"),
    ("--config.train.total_steps=-5", "config.train.total_steps=-5"),
    ("--config.data.token_budget=2048", "config.data.token_budget=2048"),
    ("--config.data.batch_size=3", "config.data.batch_size=3"),
    ("--config.mesh.data=16", "needs 16 devices; 8 are present"),
    ("--config.train.optim.schedule=linear", "config.train.optim.schedule 'linear' is unknown"),
    ("--config.train.keep_checkpoints=0", "config.train.keep_checkpoints=0: must be >= 1"),
    ("--config.train.max_train_seconds=-60", "config.train.max_train_seconds=-60.0: must be >= 0"),
])
def test_train_config_mistakes_are_one_line(command, tmp_path, flag, named):
  from sora_jax import train
  code, err = command(train, DEMO, f"--workdir={tmp_path}", flag)
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err


@pytest.mark.parametrize("flag,named", [
    ("--config.vae_train.total_steps=-5", "config.vae_train.total_steps=-5"),
    ("--config.vae_train.image_pixels=100", "config.vae_train.image_pixels=100"),
    ("--config.vae_train.video_pixels=17408", "makes 1 video crops per step, not a multiple of"),
    ("--config.mesh.data=16", "needs 16 devices; 8 are present"),
    ("--config.vae_train.video_frames=6", "config.vae_train.video crop 6x32x32 is off the VAE's grid"),
])
def test_train_vae_config_mistakes_are_one_line(command, tmp_path, flag, named):
  from sora_jax import train_vae
  # 8 image crops of 32x32 (the 8 fake devices split them), unless the case sets image_pixels itself
  base = [] if "image_pixels" in flag else ["--config.vae_train.image_pixels=8192"]
  code, err = command(train_vae, DEMO, f"--workdir={tmp_path}", *base, flag)
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err


def _fails_in_one_line(cli, capsys, *args) -> str:
  with pytest.raises(SystemExit) as e:
    cli(*args)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
  return err


@pytest.fixture
def no_sampling(monkeypatch):
  """Any sampling fails the test: the mistakes below must be caught before it."""
  from sora_jax import sampling

  def generate(*args, **kwargs):
    raise AssertionError("sampled before checking the input")
  monkeypatch.setattr(sampling, "generate", generate)


def test_an_unwritable_out_is_refused_before_sampling(cli, tmp_path, capsys, no_sampling):
  (tmp_path / "file").write_text("")
  out = tmp_path / "file" / "x.mp4"  # as root nothing is read-only: a path under a file is unwritable
  err = _fails_in_one_line(cli, capsys, "--prompt=x", f"--out={out}")
  assert f"{out} cannot be written" in err
  (tmp_path / "d.mp4").mkdir()
  err = _fails_in_one_line(cli, capsys, "--prompt=x", f"--out={tmp_path / 'd.mp4'}")
  assert "is a folder" in err


@pytest.mark.parametrize("line,named", [
    ("cap | 0 | 0x0", "num_frames 0, height 0, width 0"),
    ("cap | 5 | 0x16", "height 0"),
    (" | 5 | 16x16", "empty caption"),
])
def test_prompts_file_zero_sizes_and_empty_captions_are_refused(cli, tmp_path, capsys, no_sampling,
                                                                line, named):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\n" + line + "\n")
  err = _fails_in_one_line(cli, capsys, f"--prompts_file={prompts}", f"--out={tmp_path / 'x.mp4'}")
  assert f"{prompts}:2:" in err and named in err, err


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_is_refused(cli, tmp_path, capsys, no_sampling, prompt):
  err = _fails_in_one_line(cli, capsys, "--prompt=a red circle", f"--prompt={prompt}",
                           f"--out={tmp_path / 'x.mp4'}")
  assert "--prompt #2 is empty" in err


def test_a_caption_that_is_not_utf8_is_reported_not_stored(tmp_path):
  from sora_jax import video_io
  from sora_jax.data import ingest
  folder, out = tmp_path / "in", tmp_path / "out"
  folder.mkdir()
  for name in ("a.mp4", "b.mp4", "c.mp4"):
    video_io.write_video(folder / name, np.zeros((9, 32, 32, 3), np.uint8), 8)
  (folder / "captions.jsonl").write_bytes(
      b'{"file": "a.mp4", "caption": "a caf\xc3\xa9 at night"}\n'        # valid UTF-8
      b'{"file": "b.mp4", "caption": "a caf\xe9 at night"}\n'            # Latin-1: invalid UTF-8
      b'{"file": "c.mp4", "caption": "half a pair \\ud800"}\n')          # a lone surrogate
  proc = _ingest(folder, out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((out / ingest.REPORT).read_text())
  reasons = {s["file"]: s["reason"] for s in report["skipped"]}
  assert reasons == {
      "b.mp4": "caption is not valid UTF-8 (byte 0xe9 at column 36 of line 2 of captions.jsonl)",
      "c.mp4": "caption is not valid UTF-8 (lone surrogate '\\ud800' at character 13 (line 3) of "
               "captions.jsonl)"}, reasons
  assert [r["caption"] for r in sources.video_source(out, "train")] == ["a café at night"]


def _portrait(frames=9):
  """A portrait clip, 64 high and 32 wide, with a white square in its top-left corner."""
  video = np.zeros((frames, 64, 32, 3), np.uint8)
  video[:, 4:16, 4:16] = 255
  return video


def _white_centre(frame):
  return np.argwhere(frame[..., 0] > 128).mean(0)


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_a_rotated_video_is_read_and_ingested_upright(tmp_path, degrees):
  """As a phone stores portrait video: landscape pictures plus a display matrix (written with PyAV 18's
  `set_display_rotation`, degrees counterclockwise, as `VideoFrame.rotation` reads them back)."""
  import av
  from sora_jax import video_io
  from sora_jax.data import ingest
  upright = _portrait()
  stored = np.rot90(upright, k=-degrees // 90, axes=(1, 2))  # turned back by `degrees` on display
  path = tmp_path / "phone.mp4"
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=8)
    stream.width, stream.height, stream.pix_fmt = stored.shape[2], stored.shape[1], "yuv420p"
    stream.set_display_rotation(degrees)
    for f in stored:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  video, _ = video_io.read_video(path)
  assert video.shape == upright.shape
  np.testing.assert_allclose(_white_centre(video[0]), _white_centre(upright[0]), atol=1.0)
  clip = ingest.process_file(path, ingest.IngestOptions())[0]
  assert clip.shape[1] > clip.shape[2]  # stored portrait, as shown
  assert _white_centre(clip[0])[0] < clip.shape[1] / 4 and _white_centre(clip[0])[1] < clip.shape[2] / 2


def test_an_image_with_exif_orientation_is_read_upright(tmp_path):
  from PIL import Image
  from sora_jax import video_io
  upright = _portrait(1)[0]
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1))).save(tmp_path / "phone.jpg", exif=exif,
                                                                     quality=95)
  frames, _ = video_io.read_video(tmp_path / "phone.jpg")
  assert frames.shape[1:] == upright.shape
  np.testing.assert_allclose(_white_centre(frames[0]), _white_centre(upright), atol=1.0)


@pytest.mark.parametrize("field,value,named", [
    ("dtype", "bfloat16", "says dtype='bfloat16', its weights are ['float32']"),
    ("parameters.dit", 12, "says parameters.dit=12, its weights hold"),
    ("parameters.vae", 0, "says parameters.vae=0, its weights hold"),
])
def test_a_manifest_whose_own_fields_disagree_with_the_weights_is_refused(bundle_dir, tmp_path, field,
                                                                          value, named):
  import shutil
  from sora_jax import bundle as bundle_lib
  copy = tmp_path / "b"
  shutil.copytree(bundle_dir, copy)
  manifest = json.loads((copy / "manifest.json").read_text())
  node = manifest
  *path, last = field.split(".")
  for key in path:
    node = node[key]
  node[last] = value
  (copy / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(bundle_lib.BundleError, match=re.escape(named)):
    bundle_lib.load(copy)
