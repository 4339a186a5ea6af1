"""Figures: PNGs are written, and the Pareto front is right on a hand-made set."""

from __future__ import annotations

import numpy as np
import pytest

from matquant_jax.evaluation import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
  data = path.read_bytes()
  return len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_code_histograms_png(tmp_path):
  rng = np.random.default_rng(0)
  base = np.bincount(rng.normal(128, 30, 20000).clip(0, 255).astype(int), minlength=256)
  shifted = np.bincount(rng.normal(150, 30, 20000).clip(0, 255).astype(int), minlength=256)

  def coarse(h, bits):
    return h.reshape(2**bits, -1).sum(axis=1)

  hists = {m: {8: h, 4: coarse(h, 4), 2: coarse(h, 2)}
           for m, h in (("MatQuant", shifted), ("Baseline", base))}
  out = plots.plot_code_histograms(hists, tmp_path / "fig1c" / "hist.png")
  assert out == tmp_path / "fig1c" / "hist.png" and _is_png(out)
  # An extra-precision int2 histogram (5 buckets) and a method without every width.
  hists["MatQuant EP"] = {2: np.array([1, 2, 3, 4, 1])}
  assert _is_png(plots.plot_code_histograms(hists, tmp_path / "ep.png", title="EP"))
  with pytest.raises(ValueError, match="no methods"):
    plots.plot_code_histograms({}, tmp_path / "x.png")


POINTS = [
    {"method": "MatQuant", "label": "int2", "effective_bits": 2.0, "value": 3.0},
    {"method": "Mix'n'Match", "label": "p@3", "effective_bits": 3.0, "value": 2.8},
    {"method": "MatQuant-Interp.", "label": "int3", "effective_bits": 3.0, "value": 2.9},
    {"method": "MatQuant", "label": "int4", "effective_bits": 4.0, "value": 2.6},
    {"method": "Mix'n'Match", "label": "p@4.5", "effective_bits": 4.5, "value": 2.7},
    {"method": "Sliced int8", "label": "int6", "effective_bits": 6.0, "value": 2.6},
    {"method": "Baseline", "label": "int8", "effective_bits": 8.0, "value": 2.5},
    {"method": "bf16", "label": "bf16", "effective_bits": 16.0, "value": 2.55},
]


def test_pareto_front_lower_is_better():
  front = plots.pareto_front(POINTS, lower_is_better=True)
  assert [(p["effective_bits"], p["value"]) for p in front] == [
      (2.0, 3.0), (3.0, 2.8), (4.0, 2.6), (8.0, 2.5)]


def test_pareto_front_higher_is_better():
  acc = [dict(p, value=-p["value"]) for p in POINTS]  # the same set, mirrored
  front = plots.pareto_front(acc, lower_is_better=False)
  assert [(p["effective_bits"], p["value"]) for p in front] == [
      (2.0, -3.0), (3.0, -2.8), (4.0, -2.6), (8.0, -2.5)]
  # Ties: the same value at more bits is not on the front; the first of equal points is.
  tied = [{"method": "a", "effective_bits": 4.0, "value": 0.5},
          {"method": "b", "effective_bits": 4.0, "value": 0.5},
          {"method": "c", "effective_bits": 5.0, "value": 0.5}]
  assert plots.pareto_front(tied, lower_is_better=False) == [tied[0]]
  assert plots.pareto_front([], lower_is_better=True) == []


def test_quality_vs_bits_png(tmp_path):
  out = plots.plot_quality_vs_bits(POINTS, tmp_path / "pplx.png", metric="log_pplx")
  assert _is_png(out)
  acc = [dict(p, value=0.5 + 0.01 * p["effective_bits"]) for p in POINTS]
  acc.append({"method": "Something new", "label": "x", "effective_bits": 5.0, "value": 0.6})
  assert _is_png(plots.plot_quality_vs_bits(acc, str(tmp_path / "acc.png"), metric="task_avg"))
  with pytest.raises(ValueError, match="metric"):
    plots.plot_quality_vs_bits(POINTS, tmp_path / "x.png", metric="bleu")
  with pytest.raises(ValueError, match="lacks"):
    plots.plot_quality_vs_bits([{"method": "m", "value": 1.0}], tmp_path / "x.png")
