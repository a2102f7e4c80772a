"""The evaluation report: one self-contained `report.html` plus PNGs, viewable offline (no scripts, no
external assets). Drawn with PIL only (matplotlib is not a dependency).

- `frames_strip`: first, middle and last frame of a video side by side; `grid_png`: a labelled grid of
  such strips, one row per video (generated samples, or VAE inputs next to their reconstructions);
- `curve_png`: training curves from a run's metrics.jsonl (raw values light, a running mean dark);
- `panels_png`: stacked charts of points with interval bars over one x axis (the learning curve);
- `write_html`: headline numbers, metric tables with 95% intervals, the curves and the grids.
"""
from __future__ import annotations

import html
import math
import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sora_jax import atomic

_BG = (255, 255, 255)
_INK = (40, 40, 40)
_GRID = (225, 225, 225)


def _font(size: int = 11):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without sized default fonts
    return ImageFont.load_default()


def frames_strip(video: np.ndarray, *, long_side: int = 128, pad: int = 2) -> np.ndarray:
  """uint8 [H', 3W' + 2 pad, 3]: the first, middle and last frames of uint8 [T, H, W, 3], enlarged by the
  integer factor (nearest neighbour, so pixels stay visible) that brings the long side nearest
  `long_side`."""
  video = np.asarray(video, np.uint8)
  picks = [video[0], video[len(video) // 2], video[-1]]
  k = max(1, round(long_side / max(video.shape[1:3])))
  picks = [np.repeat(np.repeat(f, k, axis=0), k, axis=1) for f in picks]
  h, w = picks[0].shape[:2]
  out = np.full((h, 3 * w + 2 * pad, 3), 255, np.uint8)
  for i, f in enumerate(picks):
    out[:, i * (w + pad):i * (w + pad) + w] = f
  return out


def grid_png(path: str, rows: Sequence[tuple[str, Sequence[np.ndarray]]], *, long_side: int = 128,
             label_width: int = 360) -> str:
  """Writes a PNG with one row per (label, [video, ...]): the label, then each video's frames strip.

  Returns `path`. Videos of different sizes are centred in cells sized to the largest strip.
  """
  strips = [[frames_strip(v, long_side=long_side) for v in videos] for _, videos in rows]
  cell_h = max(s.shape[0] for row in strips for s in row) + 8
  cell_w = max(s.shape[1] for row in strips for s in row) + 12
  ncol = max(len(row) for row in strips)
  img = Image.new("RGB", (label_width + ncol * cell_w, max(1, len(rows)) * cell_h), _BG)
  draw = ImageDraw.Draw(img)
  font = _font(12)
  for r, ((label, _), row) in enumerate(zip(rows, strips)):
    y = r * cell_h
    for j, line in enumerate(_wrap(label, 52)[:max(1, cell_h // 15)]):
      draw.text((6, y + 6 + 15 * j), line, fill=_INK, font=font)
    for c, s in enumerate(row):
      x0 = label_width + c * cell_w + (cell_w - s.shape[1]) // 2
      y0 = y + (cell_h - s.shape[0]) // 2
      img.paste(Image.fromarray(s), (x0, y0))
    draw.line([(0, y + cell_h - 1), (img.width, y + cell_h - 1)], fill=_GRID)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
  return path


def _wrap(text: str, width: int) -> list[str]:
  lines, line = [], ""
  for word in text.split():
    if line and len(line) + 1 + len(word) > width:
      lines.append(line)
      line = word
    else:
      line = f"{line} {word}".strip()
  return lines + ([line] if line else [])


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
  if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
    return [lo]
  raw = (hi - lo) / n
  mag = 10 ** math.floor(math.log10(raw))
  step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
  first = math.ceil(lo / step) * step
  return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
  """log10 positions of 1-2-5 values (or 1..9 when the range is under a decade) inside [lo, hi]."""
  for mantissas in ((1,), (1, 2, 5), tuple(range(1, 10))):
    ticks = [math.log10(m) + e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in mantissas]
    ticks = [t for t in ticks if lo <= t <= hi]
    if len(ticks) >= 3:
      return ticks
  return ticks


def curve_png(path: str, title: str, series: Mapping[str, Sequence[tuple[float, float]]], *,
              size: tuple[int, int] = (640, 300), log_y: bool = False) -> str | None:
  """Writes a line chart of {name: [(step, value), ...]} to `path`; None when nothing is finite."""
  series = {k: [(float(s), float(v)) for s, v in pts if math.isfinite(float(v)) and (v > 0 or not log_y)]
            for k, pts in series.items()}
  series = {k: v for k, v in series.items() if v}
  if not series:
    return None
  tf = (lambda v: math.log10(v)) if log_y else (lambda v: v)
  xs = [s for pts in series.values() for s, _ in pts]
  ys = [tf(v) for pts in series.values() for _, v in pts]
  x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
  y_lo, y_hi = min(ys), max(ys)
  if y_hi - y_lo < 1e-12:
    y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
  pad_y = 0.05 * (y_hi - y_lo)
  y_lo, y_hi = y_lo - pad_y, y_hi + pad_y
  W, H = size
  left, right, top, bottom = 64, 16, 28, 36
  img = Image.new("RGB", size, _BG)
  draw = ImageDraw.Draw(img)
  font = _font(11)
  px = lambda s: left + (s - x_lo) / (x_hi - x_lo) * (W - left - right)
  py = lambda v: top + (y_hi - v) / (y_hi - y_lo) * (H - top - bottom)
  y_ticks = _log_ticks(y_lo, y_hi) if log_y else _nice_ticks(y_lo, y_hi)
  for t in y_ticks:
    y = py(t)
    draw.line([(left, y), (W - right, y)], fill=_GRID)
    label = f"{10 ** t:.3g}" if log_y else f"{t:.3g}"
    draw.text((4, y - 6), label, fill=_INK, font=font)
  for t in _nice_ticks(x_lo, x_hi):
    x = px(t)
    draw.line([(x, top), (x, H - bottom)], fill=_GRID)
    draw.text((x - 10, H - bottom + 4), f"{t:g}", fill=_INK, font=font)
  draw.rectangle([left, top, W - right, H - bottom], outline=_INK)
  palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
  legend_x = left + 8
  for i, (name, pts) in enumerate(sorted(series.items())):
    colour = palette[i % len(palette)]
    light = tuple(int(c + 0.65 * (255 - c)) for c in colour)
    pts = sorted(pts)
    raw = [(px(s), py(tf(v))) for s, v in pts]
    if len(raw) > 1:
      draw.line(raw, fill=light, width=1)
      k = max(1, len(pts) // 20)  # running mean over ~5% of the points
      vals = np.array([tf(v) for _, v in pts])
      smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
      draw.line([(px(pts[j + k - 1][0]), py(v)) for j, v in enumerate(smooth)], fill=colour, width=2)
    else:
      x, y = raw[0]
      draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    draw.text((legend_x, 8), name, fill=colour, font=font)
    legend_x += 8 + 7 * len(name)
  draw.text((W // 2 - 3 * len(title), H - 16), title, fill=_INK, font=font)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
  return path


def _dashed(draw, y: float, x0: float, x1: float, fill, dash: int = 6) -> None:
  for x in range(int(x0), int(x1), 2 * dash):
    draw.line([(x, y), (min(x + dash, x1), y)], fill=fill, width=1)


def panels_png(path: str, panels: Sequence[Mapping], *, x_label: str, log_x: bool = False,
               size: tuple[int, int] = (640, 220)) -> str:
  """Writes charts stacked over one shared x axis (ticks at the data's x values) to `path`; returns it.

  Each panel is {"title": str, "series": {name: [(x, y, lo, hi), ...]}, "refs": {name: y} (optional,
  dashed horizontal lines), "y_range": (lo, hi) (optional; else the data's)}: points with their interval
  as a bar, joined by lines. Non-finite values are left out.
  """
  fin = lambda v: v is not None and math.isfinite(float(v))
  xs = sorted({float(p[0]) for panel in panels for pts in panel["series"].values() for p in pts})
  if not xs:
    xs = [0.0, 1.0]
  tx = (lambda x: math.log10(x)) if log_x and xs[0] > 0 else (lambda x: x)
  x_lo, x_hi = tx(xs[0]), tx(xs[-1])
  pad = 0.06 * (x_hi - x_lo) if x_hi > x_lo else 0.5
  x_lo, x_hi = x_lo - pad, x_hi + pad
  W, H = size
  left, right, top, bottom = 64, 16, 30, 26
  palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
  font = _font(11)
  img = Image.new("RGB", (W, H * len(panels) + 20), _BG)
  draw = ImageDraw.Draw(img)
  px = lambda x: left + (tx(x) - x_lo) / (x_hi - x_lo) * (W - left - right)
  for k, panel in enumerate(panels):
    y0 = k * H
    refs = {n: float(v) for n, v in (panel.get("refs") or {}).items() if fin(v)}
    if panel.get("y_range"):
      lo, hi = (float(v) for v in panel["y_range"])
    else:
      vals = [float(v) for pts in panel["series"].values() for p in pts for v in p[1:] if fin(v)]
      vals += list(refs.values())
      lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
      if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
      lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    py = lambda v, lo=lo, hi=hi, y0=y0: y0 + top + (hi - v) / (hi - lo) * (H - top - bottom)
    for t in _nice_ticks(lo, hi, 4):
      draw.line([(left, py(t)), (W - right, py(t))], fill=_GRID)
      draw.text((4, py(t) - 6), f"{t:.3g}", fill=_INK, font=font)
    for x in xs:
      draw.line([(px(x), y0 + top), (px(x), y0 + H - bottom)], fill=_GRID)
      draw.text((px(x) - 3 * len(f"{x:g}"), y0 + H - bottom + 4), f"{x:g}", fill=_INK, font=font)
    draw.rectangle([left, y0 + top, W - right, y0 + H - bottom], outline=_INK)
    draw.text((left, y0 + 4), panel["title"], fill=_INK, font=font)
    legend_x = left + 8 + 7 * len(panel["title"]) + 12
    for name, v in refs.items():
      _dashed(draw, py(v), left, W - right, (120, 120, 120))
      draw.text((W - right - 7 * len(name) - 4, py(v) - 14), name, fill=(120, 120, 120), font=font)
    n = len(panel["series"])
    for i, (name, pts) in enumerate(panel["series"].items()):
      colour = palette[i % len(palette)]
      dodge = 5 * (i - (n - 1) / 2)  # series side by side, so equal values do not hide each other's bars
      pts = sorted((float(p[0]), *p[1:]) for p in pts if fin(p[1]))
      if len(pts) > 1:
        draw.line([(px(p[0]) + dodge, py(float(p[1]))) for p in pts], fill=colour, width=2)
      for x, y, *ci in pts:
        x_ = px(x) + dodge
        if len(ci) == 2 and fin(ci[0]) and fin(ci[1]):
          a, b = py(float(ci[0])), py(float(ci[1]))
          draw.line([(x_, a), (x_, b)], fill=colour, width=1)
          draw.line([(x_ - 3, a), (x_ + 3, a)], fill=colour)
          draw.line([(x_ - 3, b), (x_ + 3, b)], fill=colour)
        draw.ellipse([x_ - 3, py(float(y)) - 3, x_ + 3, py(float(y)) + 3], fill=colour)
      draw.text((legend_x, y0 + 4), name, fill=colour, font=font)
      legend_x += 12 + 7 * len(name)
  draw.text((W // 2 - 3 * len(x_label), img.height - 16), x_label, fill=_INK, font=font)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
  return path


# ------------------------------------------------------------------------------------------------ HTML
_CSS = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:90%}
img{max-width:100%;image-rendering:pixelated}h2{margin-top:32px}"""


def _pct(rate: Mapping | None) -> str:
  if not rate or not rate.get("n"):
    return "&ndash;"
  lo, hi = rate["ci95"]
  return f"{100 * rate['rate']:.1f}% <span class=note>[{100 * lo:.1f}, {100 * hi:.1f}] n={rate['n']}</span>"


def metric_table(groups: Mapping[str, Mapping[str, Mapping]], metrics: Sequence[str]) -> str:
  """HTML table: one row per group of clips, one column per metric (rate, 95% interval, n)."""
  head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
  rows = "".join(f"<tr><td>{html.escape(g)}</td>" + "".join(f"<td>{_pct(vals.get(m))}</td>" for m in metrics)
                 + "</tr>" for g, vals in groups.items())
  return f"<table><tr><th>clips</th>{head}</tr>{rows}</table>"


def kv_table(rows: Sequence[tuple[str, str]]) -> str:
  return "<table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in rows) + "</table>"


def write_html(path: str, *, title: str, headline: Sequence[tuple[str, str]],
               sections: Sequence[tuple[str, str]]) -> str:
  """Writes report.html: a headline table, then (heading, html body) sections. Returns `path`."""
  body = [f"<h1>{html.escape(title)}</h1>", kv_table(headline)]
  for heading, content in sections:
    body.append(f"<h2>{html.escape(heading)}</h2>{content}")
  doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
  atomic.write_text(path, doc)
  return path


def img(src: str, alt: str = "") -> str:
  return f"<p><img src='{html.escape(src)}' alt='{html.escape(alt)}'></p>"
