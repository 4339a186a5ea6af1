"""Result tables in the paper's layout (Tables 1-2): Markdown, CSV and JSON.

One record per (method, bit-width or plan):

    {"method": "matquant", "bits": 2, "plan": "ffn:int2", "effective_bits": 2.0,
     "log_pplx": 3.19, "tasks": {"arc_easy": {"acc": .., "acc_norm": ..}, ...},
     "task_avg": 63.35}

Rows are grouped by data type in the paper's order (bf16, int8, int4, int2, int6, int3, then
any other width, then Mix'n'Match plans by effective bits) and, within a data type, by method
(Sliced int8, Baseline, MatQuant, Single Precision, Extra Precision). Accuracies print as
percentages with two decimals, log perplexity with three, like the paper.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
from typing import Any, Iterable, Mapping, Sequence

METHOD_ORDER = ("bf16", "minmax", "sliced_int8", "baseline", "omniquant_baseline", "matquant",
                "omniquant_matquant", "single_precision", "extra_precision", "mix_n_match",
                "mix_n_match_search")
METHOD_LABELS = {
    "bf16": "bf16", "minmax": "MinMax", "sliced_int8": "Sliced int8", "baseline": "Baseline",
    "omniquant_baseline": "OmniQuant Baseline", "matquant": "MatQuant",
    "omniquant_matquant": "OmniQuant MatQuant", "single_precision": "Single Precision",
    "extra_precision": "Extra Precision", "mix_n_match": "Mix'n'Match",
    "mix_n_match_search": "Mix'n'Match search",
}
DTYPE_ORDER = (16, 8, 4, 2, 6, 3)
MIX_METHODS = ("mix_n_match", "mix_n_match_search")  # rows labelled by effective bits
TASK_LABELS = {"arc_challenge": "ARC-c", "arc_easy": "ARC-e", "boolq": "BoolQ",
               "hellaswag": "HellaS", "piqa": "PIQA", "winogrande": "Wino",
               "kjv_next_verse": "KJV-NV", "kjv_verse_completion": "KJV-VC"}


def _dtype_key(rec: Mapping[str, Any]) -> tuple:
  if rec["method"] in MIX_METHODS:
    return (len(DTYPE_ORDER) + 1, rec.get("effective_bits") or 0, rec.get("plan", ""))
  bits = rec.get("bits") or 16
  rank = DTYPE_ORDER.index(bits) if bits in DTYPE_ORDER else len(DTYPE_ORDER)
  return (rank, -bits, "")


def _method_key(rec: Mapping[str, Any]) -> int:
  m = rec["method"]
  return METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)


def sort_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  return sorted(records, key=lambda r: (_dtype_key(r), _method_key(r), r.get("label", "")))


def dtype_label(rec: Mapping[str, Any]) -> str:
  if rec["method"] in MIX_METHODS:
    return f"{rec.get('effective_bits', 0):.2f}b"
  bits = rec.get("bits")
  if not bits or bits >= 16:
    return "bf16"
  ep = rec.get("effective_bits")
  if rec.get("extra_precision") and ep:
    return f"int{bits} ({ep:.3f}b)"
  return f"int{bits}"


def task_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
  names: list[str] = []
  for r in records:
    for t in (r.get("tasks") or {}):
      if t not in names:
        names.append(t)
  return names


def _row(rec, tasks, metric_of) -> list[str]:
  cells = [dtype_label(rec), rec.get("label") or METHOD_LABELS.get(rec["method"], rec["method"])]
  for t in tasks:
    res = (rec.get("tasks") or {}).get(t)
    cells.append(f"{100 * res[metric_of(t)]:.2f}" if res else "–")
  avg = rec.get("task_avg")
  cells.append(f"{avg:.2f}" if avg is not None else "–")
  lp = rec.get("log_pplx")
  cells.append(f"{lp:.3f}" if lp is not None else "–")
  return cells


def to_markdown(records: Sequence[Mapping[str, Any]], metric_of=lambda t: "acc_norm",
                title: str | None = None) -> str:
  recs = sort_records(records)
  tasks = task_names(recs)
  head = ["dtype", "method"] + [TASK_LABELS.get(t, t) for t in tasks] + ["Task Avg", "log pplx"]
  lines = []
  if title:
    lines += [f"**{title}**", ""]
  lines.append("| " + " | ".join(head) + " |")
  lines.append("|" + "|".join("---" for _ in head) + "|")
  for r in recs:
    lines.append("| " + " | ".join(_row(r, tasks, metric_of)) + " |")
  return "\n".join(lines) + "\n"


def to_csv(records: Sequence[Mapping[str, Any]]) -> str:
  recs = sort_records(records)
  tasks = task_names(recs)
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(["method", "label", "bits", "plan", "effective_bits", "log_pplx", "task_avg"] +
             [f"{t}_{m}" for t in tasks for m in ("acc", "acc_norm")])
  for r in recs:
    row = [r["method"], r.get("label", ""), r.get("bits"), r.get("plan", ""),
           r.get("effective_bits"), r.get("log_pplx"), r.get("task_avg")]
    for t in tasks:
      res = (r.get("tasks") or {}).get(t) or {}
      row += [res.get("acc"), res.get("acc_norm")]
    w.writerow(row)
  return buf.getvalue()


def write_tables(records: Sequence[Mapping[str, Any]], out_dir: str | pathlib.Path, *,
                 name: str = "table", metric_of=lambda t: "acc_norm",
                 title: str | None = None) -> dict[str, pathlib.Path]:
  """Writes <name>.md, <name>.csv and <name>.json; returns their paths."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"md": out / f"{name}.md", "csv": out / f"{name}.csv", "json": out / f"{name}.json"}
  paths["md"].write_text(to_markdown(records, metric_of, title))
  paths["csv"].write_text(to_csv(records))
  paths["json"].write_text(json.dumps(sort_records(records), indent=2, default=float))
  return paths
