"""Baseline QAT at one bit-width with MinMax(r) (Table 2 "B" rows; "S8" = int8 sliced at eval).

    python -m matquant_jax.train --config=configs/qat_baseline.py:gemma2_9b,int4 ...

arg: <model>,int<r> with r in 8, 6, 4, 3, 2.
"""

from matquant_jax.training.config import paper_qat_config, parse_config_arg


def get_config(arg="gemma2_9b,int8"):
  a = parse_config_arg(arg, ("model", "bits"))
  if a["bits"] not in ("int8", "int6", "int4", "int3", "int2"):
    raise ValueError(f"baseline bits {a['bits']!r}: use int8, int6, int4, int3 or int2.")
  c = paper_qat_config(a["model"])
  c.objective.method = "baseline"
  c.objective.bits = (int(a["bits"][3:]),)
  return c
