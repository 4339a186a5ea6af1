"""The paper's figures as PNGs (matplotlib, Agg backend: no display needed).

- `plot_code_histograms`: Fig. 1c (spec §9.1): the int8 / int4 / int2 code histograms of
  MatQuant next to a baseline, as fractions per bucket, one panel per bit-width. MatQuant's
  signature is mass shifted toward the higher buckets.
- `plot_quality_vs_bits`: Fig. 2 (spec §5.3): log pplx or task average against effective bits
  per FFN parameter, one marker and colour per method (MatQuant, Mix'n'Match, Baseline, Sliced
  int8, MatQuant-Interp., ...), with the Pareto front over all points as a step line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Before pyplot: render to files on headless machines.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

PathLike = str | os.PathLike

# Fixed styles for the paper's methods, so every figure uses the same colour for each.
METHOD_STYLES: dict[str, dict[str, str]] = {
    "MatQuant": {"color": "tab:blue", "marker": "o"},
    "Mix'n'Match": {"color": "tab:green", "marker": "s"},
    "Mix'n'Match search": {"color": "darkgreen", "marker": "*"},
    "Baseline": {"color": "tab:orange", "marker": "^"},
    "Sliced int8": {"color": "tab:red", "marker": "v"},
    "MatQuant-Interp.": {"color": "tab:purple", "marker": "D"},
    "MinMax": {"color": "tab:brown", "marker": "P"},
    "bf16": {"color": "black", "marker": "*"},
}
_EXTRA_STYLES = [("tab:pink", "X"), ("tab:gray", "h"), ("tab:olive", "<"), ("tab:cyan", ">")]

METRIC_LABELS = {
    "log_pplx": ("log perplexity (lower is better)", True),
    "task_avg": ("task average accuracy (higher is better)", False),
    "kl": ("KL to the int8 model on calibration text, nats (lower is better)", True),
}
X_LABEL = "effective bits per FFN parameter"


def _style(method: str, extra: dict[str, dict[str, str]]) -> dict[str, str]:
  if method in METHOD_STYLES:
    return METHOD_STYLES[method]
  if method not in extra:
    color, marker = _EXTRA_STYLES[len(extra) % len(_EXTRA_STYLES)]
    extra[method] = {"color": color, "marker": marker}
  return extra[method]


def _save(fig, path: PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=150, bbox_inches="tight", format="png")
  plt.close(fig)
  return path


# Fig. 1c ---------------------------------------------------------------------------------------


def plot_code_histograms(hists_by_method: Mapping[str, Mapping[int, Sequence[float]]],
                         path: PathLike, *, title: str | None = None) -> pathlib.Path:
  """Bucket histograms of quantized codes per bit-width, methods side by side (Fig. 1c).

  Args:
    hists_by_method: {method: {bits: counts [num_buckets]}}, e.g. from
      `quant.stats.tree_code_histograms` of the MatQuant and baseline params. Counts are
      normalised to fractions per bucket, so methods with different weight counts compare.
    path: output PNG.
    title: figure title (default names the figure).

  Returns:
    The PNG path.
  """
  if not hists_by_method:
    raise ValueError("plot_code_histograms: no methods given.")
  bit_widths = sorted({int(b) for h in hists_by_method.values() for b in h}, reverse=True)
  if not bit_widths:
    raise ValueError("plot_code_histograms: the methods have no histograms.")
  methods = list(hists_by_method)
  fig, axes = plt.subplots(1, len(bit_widths), figsize=(4.8 * len(bit_widths), 3.8),
                           squeeze=False)
  extra: dict[str, dict[str, str]] = {}
  for ax, bits in zip(axes[0], bit_widths):
    present = [m for m in methods
               if bits in hists_by_method[m] or str(bits) in hists_by_method[m]]
    for j, method in enumerate(present):
      h = hists_by_method[method]
      counts = np.asarray(h[bits] if bits in h else h[str(bits)], np.float64)
      frac = counts / counts.sum() if counts.sum() else counts
      color = _style(method, extra)["color"]
      idx = np.arange(len(frac))
      if len(frac) <= 32:
        # Few buckets: grouped bars, one slot per method inside each bucket.
        width = 0.8 / len(present)
        ax.bar(idx - 0.4 + width * (j + 0.5), frac, width=width, color=color, label=method)
        ax.set_xticks(idx)
      else:
        # 256 int8 buckets: bars would be unreadable; overlaid outlines with a light fill.
        ax.stairs(frac, np.arange(len(frac) + 1) - 0.5, color=color, label=method,
                  fill=True, alpha=0.25)
        ax.stairs(frac, np.arange(len(frac) + 1) - 0.5, color=color, linewidth=1.0)
    extra_bucket = _has_extra_bucket(hists_by_method, bits)
    ax.set_title(f"int{bits}" + (" (+ extra bucket)" if extra_bucket else ""))
    ax.set_xlabel("bucket (code value)")
    ax.set_ylabel("fraction of weights")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title or "Quantized weight distribution per bit-width (MatQuant vs baseline)")
  fig.tight_layout()
  return _save(fig, path)


def _has_extra_bucket(hists, bits: int) -> bool:
  for h in hists.values():
    counts = h.get(bits, h.get(str(bits)))
    if counts is not None and len(counts) == 2**bits + 1:
      return True
  return False


# Fig. 2 ----------------------------------------------------------------------------------------


def pareto_front(points: Sequence[Mapping[str, Any]], *,
                 lower_is_better: bool) -> list[Mapping[str, Any]]:
  """The points no other point beats with as few or fewer bits, sorted by effective bits.

  A point is on the front iff every point with effective_bits <= its own has a worse value
  (strictly): ties in value keep the one with fewer bits, ties in both keep the first given.

  Args:
    points: dicts with 'effective_bits' and 'value'.
    lower_is_better: True for log pplx, False for accuracy.

  Returns:
    The front, by increasing effective bits (and increasing quality).
  """
  sign = 1.0 if lower_is_better else -1.0
  order = sorted(range(len(points)),
                 key=lambda i: (float(points[i]["effective_bits"]),
                                sign * float(points[i]["value"]), i))
  front, best = [], None
  for i in order:
    v = sign * float(points[i]["value"])
    if not np.isfinite(v):
      continue
    if best is None or v < best:
      front.append(points[i])
      best = v
  return front


def plot_quality_vs_bits(points: Sequence[Mapping[str, Any]], path: PathLike,
                         metric: str = "log_pplx", *, title: str | None = None,
                         annotate: bool = True) -> pathlib.Path:
  """Quality against effective bits per FFN parameter, with the Pareto front (Fig. 2).

  Args:
    points: dicts {method, label, effective_bits, value}; `method` picks the marker and colour
      (MatQuant, Mix'n'Match, Baseline, Sliced int8, MatQuant-Interp., others get their own),
      `label` (e.g. 'int4', 'pyramid@3.0') is written next to the point when annotate.
    path: output PNG.
    metric: 'log_pplx' (lower is better) or 'task_avg' (higher is better).
    title: figure title.
    annotate: write each point's label.

  Returns:
    The PNG path.
  """
  if metric not in METRIC_LABELS:
    raise ValueError(f"metric must be one of {list(METRIC_LABELS)}, got {metric!r}.")
  if not points:
    raise ValueError("plot_quality_vs_bits: no points given.")
  for p in points:
    missing = [k for k in ("method", "effective_bits", "value") if k not in p]
    if missing:
      raise ValueError(f"point {dict(p)} lacks {missing}; each point needs method, label, "
                       f"effective_bits and value.")
  y_label, lower_is_better = METRIC_LABELS[metric]
  fig, ax = plt.subplots(figsize=(7.5, 5.0))
  extra: dict[str, dict[str, str]] = {}
  for method in dict.fromkeys(p["method"] for p in points):
    mine = [p for p in points if p["method"] == method]
    style = _style(method, extra)
    ax.scatter([float(p["effective_bits"]) for p in mine], [float(p["value"]) for p in mine],
               color=style["color"], marker=style["marker"], s=55, label=method, zorder=3,
               edgecolors="white", linewidths=0.5)
    if annotate:
      for p in mine:
        if p.get("label"):
          ax.annotate(str(p["label"]), (float(p["effective_bits"]), float(p["value"])),
                      textcoords="offset points", xytext=(5, 4), fontsize=7,
                      color=style["color"])
  front = pareto_front(points, lower_is_better=lower_is_better)
  if front:
    xs = [float(p["effective_bits"]) for p in front]
    ys = [float(p["value"]) for p in front]
    # The best quality reachable with at most x bits: flat until the next front point.
    right = max(float(p["effective_bits"]) for p in points)
    ax.step(xs + [right], ys + [ys[-1]], where="post", color="0.35", linestyle="--",
            linewidth=1.2, label="Pareto front", zorder=2)
  ax.set_xlabel(X_LABEL)
  ax.set_ylabel(y_label)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  ax.set_title(title or f"{'Log perplexity' if metric == 'log_pplx' else 'Task average'} vs "
               f"effective bits")
  fig.tight_layout()
  return _save(fig, path)
