"""Ingests a folder of captioned videos and images into a video data set (same format as Shapes).

    python data_pipelines/ingest_videos.py --input DIR --captions DIR/captions.jsonl --out_dir D \
        [--split train] [--fps 8] [--max_seconds 4] [--max_pixels 16384] [--num_workers 2]

`captions.jsonl` holds one {"file": "path relative to DIR", "caption": "..."} per line. Files are
decoded in --num_workers processes (progress bar on stderr), resampled to --fps, resized keeping their
aspect ratio into --max_pixels (sides multiples of 16), and split into clips of at most --max_seconds
(frame counts 1 + 4k). Corrupt, empty, truncated, unreadable or caption-less files are skipped and
listed with their reason in D/ingest_report.json; a one-line summary is printed and the exit status is 0
(1 only when no file at all could be ingested). A re-ingest into the same split replaces it only when
it completes with at least one file: otherwise (no good file, Ctrl-C, a full disk) the previous split
is kept as it was, and the summary says so. Read the result with
`sora_jax.data.sources.video_source(D, split)`; details in docs/data.md.
"""
from __future__ import annotations

import collections
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

from absl import app, flags, logging
from tqdm import tqdm

from sora_jax import atomic
from sora_jax.data import ingest, sources

_INPUT = flags.DEFINE_string("input", None, "folder of videos and images", required=True)
_CAPTIONS = flags.DEFINE_string("captions", None, "captions jsonl; default INPUT/captions.jsonl")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "tfds data dir to write into", required=True)
_SPLIT = flags.DEFINE_string("split", "train", "split name to write")
_NAME = flags.DEFINE_string("name", "videos", "data set name (directory under out_dir)")
_FPS = flags.DEFINE_float("fps", 8.0, "output frame rate", lower_bound=0.1)
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 4.0, "longest clip; longer videos are split",
                                  lower_bound=0.0)
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", 128 * 128, "H * W budget of output frames",
                                   lower_bound=32 * 32)
_WORKERS = flags.DEFINE_integer("num_workers", min(4, os.cpu_count() or 1),
                                "decoding processes (0: decode in this process)", lower_bound=0)


def _kind(reason: str) -> str:
  return reason.split(" (")[0].split(";")[0]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # tfds logs every step of a build at INFO
  start = time.time()
  root = Path(_INPUT.value)
  if not root.is_dir():
    print(f"ingest: --input {root} is not a folder", file=sys.stderr)
    sys.exit(2)
  captions = Path(_CAPTIONS.value) if _CAPTIONS.value else root / "captions.jsonl"
  if not captions.is_file():
    print(f"ingest: captions file {captions} does not exist", file=sys.stderr)
    sys.exit(2)
  opts = ingest.IngestOptions(fps=_FPS.value, max_seconds=_MAX_SECONDS.value,
                              max_pixels=_MAX_PIXELS.value)
  jobs, skipped = ingest.plan(root, captions)
  ingested = []

  def examples():
    args = [(str(root), job, opts) for job in jobs]
    if _WORKERS.value == 0:
      results = map(ingest.run_job, args)
      pool = None
    else:
      # spawn: workers must not inherit libav's decoder threads or this process's locks
      pool = multiprocessing.get_context("spawn").Pool(_WORKERS.value)
      results = pool.imap(ingest.run_job, args, chunksize=1)
    try:
      for job, clips, reason in tqdm(results, total=len(jobs), desc="ingest", unit="file",
                                     file=sys.stderr, dynamic_ncols=True):
        if clips is None:
          skipped.append({"file": job.file, "reason": reason})
          continue
        ingested.append({"file": job.file, "clips": [list(c.shape[:3]) for c in clips]})
        for k, clip in enumerate(clips):
          yield {"video": clip, "caption": job.caption, "num_frames": clip.shape[0],
                 "height": clip.shape[1], "width": clip.shape[2], "fps": opts.fps, "labels": "",
                 "source": f"{job.file}#clip{k}@{k * opts.max_frames / opts.fps:.3f}s"}
    finally:
      if pool is not None:
        pool.terminate()

  out_dir = Path(_OUT_DIR.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  previous = out_dir / _NAME.value / _SPLIT.value / sources.VERSION
  previous = previous if (previous / "dataset_info.json").is_file() else None
  written = None
  try:
    written = sources.write_dataset(
        out_dir, name=_NAME.value, split=_SPLIT.value, features=sources.video_features(),
        examples=examples(), description=f"videos ingested from {root}")
  except AssertionError:  # tfds refuses to write a split with no examples
    if ingested:
      raise
  num_clips = sum(len(f["clips"]) for f in ingested)
  kinds = collections.Counter(_kind(s["reason"]) for s in skipped)
  kept = previous if written is None else None
  summary = (f"ingest: {len(ingested)} files -> {num_clips} clips in {written or 'nothing'}"
             + (f" (kept the previous split {kept})" if kept else "") + "; "
             f"skipped {len(skipped)}" + (f" ({', '.join(f'{n} {k}' for k, n in kinds.most_common())})"
                                          if skipped else "")
             + f"; report {out_dir / ingest.REPORT}; {time.time() - start:.1f}s")
  report = {"input": str(root), "captions": str(captions), "output": str(written or ""),
            "kept": str(kept or ""),
            "split": _SPLIT.value, "options": vars(opts) | {"max_frames": opts.max_frames},
            "ingested": ingested, "skipped": sorted(skipped, key=lambda s: s["file"]),
            "num_files": len(ingested), "num_clips": num_clips, "num_skipped": len(skipped),
            "summary": summary}
  atomic.write_text(out_dir / ingest.REPORT, json.dumps(report, indent=2) + "\n")
  print(summary)
  if not ingested:
    sys.exit(1)


if __name__ == "__main__":
  sys.exit(app.run(main))
