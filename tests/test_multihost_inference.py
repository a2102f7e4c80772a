"""Multi-host inference: the work-splitting helpers and the sample, evaluate, export and reconstruct
commands as 2-process jobs (jax.distributed on localhost, one CPU device each), against 1 process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def ours(stdout: str) -> str:
  """stdout without gloo's own connection lines (printed by its C++ code, not through Python)."""
  return "".join(l for l in stdout.splitlines(keepends=True) if not l.startswith("[Gloo]"))


def run_two(cmd: list[str], timeout: int = 900, check: bool = True) -> list[tuple[int, str, str]]:
  """Runs `cmd` as processes 0 and 1 of one job; [(returncode, stdout, stderr)] in process order. With
  `check`, fails the test unless both exit 0."""
  port = _port()
  procs = [subprocess.Popen(cmd + [f"--coordinator=localhost:{port}", "--num_processes=2",
                                   f"--process_id={i}"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=timeout)
    out.append((p.returncode, ours(stdout), stderr))
  if check:
    assert all(rc == 0 for rc, _, _ in out), [err[-3000:] for _, _, err in out]
  return out


def run_one(cmd: list[str]) -> None:
  """Runs `cmd` as a job of one process; fails the test on a non-zero exit."""
  r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]


_HELPERS = r"""
import json, sys, time
from absl import flags
from sora_jax import distributed
flags.FLAGS(sys.argv[:1] + sys.argv[2:])
assert distributed.initialize() == 2
import jax
me = jax.process_index()

def slow_square(i):
  if i == me:  # each process is late on its own first item: the rounds must wait, not time out
    time.sleep(3)
  return {"item": i, "by": me, "square": i * i}

got = distributed.map_shared(slow_square, list(range(5)))
errors = []
for bad in (2, 3):
  try:
    distributed.map_shared(lambda i: [][i] if i == bad else i, list(range(4)))
  except Exception as e:
    errors.append([type(e).__name__, str(e)])
try:
  distributed.map_shared(lambda i: int("x%d" % i) if i == 1 else i, list(range(3)))
except ValueError as e:
  errors.append(["ValueError", str(e)])
written = distributed.write_on_main(lambda: "written by %d" % me)
print("RESULT " + json.dumps({"got": got, "errors": errors, "written": written}), file=sys.stderr)
"""


def test_map_shared_splits_items_between_processes_and_raises_everywhere(tmp_path):
  script = tmp_path / "helpers.py"
  script.write_text(_HELPERS)
  runs = run_two([sys.executable, str(script), "x"], timeout=300)
  results = [json.loads(err.split("RESULT ", 1)[1].splitlines()[0]) for _, _, err in runs]
  for r in results:
    # Every process holds every result, in item order; item i ran on process i % 2.
    assert r["got"] == [{"item": i, "by": i % 2, "square": i * i} for i in range(5)]
    assert r["written"] == "written by 0"
  # Item 2 fails on process 0 (its own IndexError), item 3 on process 1 (RemoteError elsewhere); a
  # ValueError stays a ValueError everywhere, so the commands' one-line error handling sees it.
  assert results[0]["errors"] == [["IndexError", "list index out of range"],
                                  ["RemoteError", "IndexError: list index out of range"],
                                  ["ValueError", "invalid literal for int() with base 10: 'x1'"]]
  assert results[1]["errors"] == [["RemoteError", "IndexError: list index out of range"],
                                  ["IndexError", "list index out of range"],
                                  ["ValueError", "invalid literal for int() with base 10: 'x1'"]]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  import test_export
  from sora_jax import export
  root = tmp_path_factory.mktemp("mh_inference")
  info = test_export.make_workdir(root / "run")
  export.export(info["workdir"], str(root / "bundle1"))
  return root, info


@pytest.mark.slow
def test_export_sample_evaluate_reconstruct_on_two_processes_match_one(run_dir):
  from sora_jax import bundle as bundle_lib
  from sora_jax import video_io
  root, info = run_dir
  py = sys.executable

  # export: process 0 writes the bundle, process 1 waits; the same weights as a 1-process export.
  runs = run_two([py, "-m", "sora_jax.export", f"--workdir={info['workdir']}", f"--out={root / 'bundle2'}"])
  assert "[export] wrote" in runs[0][1] and runs[1][1] == ""
  bundle_lib.verify(root / "bundle2")
  one, two = (bundle_lib.load_parts(root / name)[1:3] for name in ("bundle1", "bundle2"))
  for a, b in zip(one, two):
    fa, fb = dict(bundle_lib._flatten(a)), dict(bundle_lib._flatten(b))  # pylint: disable=protected-access
    assert fa.keys() == fb.keys()
    for k in fa:
      np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)

  # sample: 3 prompts split 2 + 1; process 0 writes all three, equal to one process's videos.
  prompts = root / "prompts.txt"
  prompts.write_text("a red circle moving left on a black background | 9 | 16x16\n"
                     "a blue square still on a gray background | 1 | 16x32\n"
                     "a red circle moving left on a black background | 5 | 32x16\n")
  args = [py, "-m", "sora_jax.sample", f"--bundle={root / 'bundle1'}", f"--prompts_file={prompts}",
          "--steps=2", "--guidance=2"]
  runs = run_two(args + [f"--out={root / 's2' / 'v.npy'}"])
  assert runs[0][1].count("wrote ") == 3 and "wrote" not in runs[1][1]
  run_one(args + [f"--out={root / 's1' / 'v.npy'}"])
  for i in range(3):
    a = np.load(root / "s1" / f"v_{i:03d}.npy")
    np.testing.assert_array_equal(np.load(root / "s2" / f"v_{i:03d}.npy"), a, err_msg=str(i))

  # evaluate: VAE clips, generation chunks and detector clips split; the same numbers as one process.
  ev = [py, "-m", "sora_jax.evaluate", f"--bundle={root / 'bundle1'}", "--num_prompts=3", "--vae_clips=3",
        "--denoise_clips=4", "--steps=2", "--guidance=2", "--mixture=demo"]
  runs = run_two(ev + [f"--out_dir={root / 'e2'}"])
  assert "[eval] report:" in runs[0][1] and runs[1][1] == ""
  run_one(ev + [f"--out_dir={root / 'e1'}"])
  m1, m2 = (json.loads((root / e / "metrics.json").read_text()) for e in ("e1", "e2"))
  assert m2["generation"]["clips"] == m1["generation"]["clips"]
  assert m2["generation"]["groups"] == m1["generation"]["groups"]
  assert [c["psnr"] for c in m2["vae_shapes"]["clips"]] == [c["psnr"] for c in m1["vae_shapes"]["clips"]]
  for key in ("blobs_per_frame", "object_token_error"):  # as text: a mean over no clips is NaN != NaN
    assert json.dumps(m2[key], sort_keys=True) == json.dumps(m1[key], sort_keys=True), key
  assert (root / "e2" / "report.html").is_file() and (root / "e2" / "samples_grid.png").is_file()

  # reconstruct: one video, done by process 0; the same frames as one process.
  clip = np.random.default_rng(0).integers(0, 255, (9, 16, 16, 3), dtype=np.uint8)
  np.save(root / "clip.npy", clip)
  rc = [py, "-m", "sora_jax.reconstruct", f"--vae={root / 'bundle1'}", f"--input={root / 'clip.npy'}"]
  runs = run_two(rc + [f"--out={root / 'r2.npy'}"])
  assert "PSNR" in runs[0][1] and runs[1][1] == ""
  run_one(rc + [f"--out={root / 'r1.npy'}"])
  np.testing.assert_array_equal(video_io.read_video(root / "r2.npy")[0], video_io.read_video(root / "r1.npy")[0])


@pytest.mark.slow
def test_a_bad_prompt_fails_on_every_process_with_one_line(run_dir):
  root, _ = run_dir
  runs = run_two([sys.executable, "-m", "sora_jax.sample", f"--bundle={root / 'bundle1'}",
                  "--prompt=a red circle", "--num_frames=4", f"--out={root / 'bad.mp4'}"], check=False)
  assert [rc for rc, _, _ in runs] == [2, 2], [err[-3000:] for _, _, err in runs]
  for _, _, err in runs:
    assert err.strip().splitlines()[-1].startswith("error:") and "4" in err.strip().splitlines()[-1]
