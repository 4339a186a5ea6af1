"""OmniQuant baseline at one bit-width r with MinMax(r), parent = r (Table 1 "B" rows; "S8" is
the int8 baseline sliced at evaluation time).

    python -m matquant_jax.calibrate --config=configs/omniquant_baseline.py:gemma2_9b,int2 ...

arg: <model>,int<r> with model gemma2_2b | gemma2_9b | mistral_7b and r in 8, 6, 4, 3, 2.
Budget 10M tokens per block, 20M for int2 (spec §6, following OmniQuant).
"""

from matquant_jax.calibration.config import paper_omniquant_config, parse_config_arg


def get_config(arg="gemma2_9b,int8"):
  a = parse_config_arg(arg, ("model", "bits"))
  if a["bits"] not in ("int8", "int6", "int4", "int3", "int2"):
    raise ValueError(f"baseline bits {a['bits']!r}: use int8, int6, int4, int3 or int2.")
  c = paper_omniquant_config(a["model"])
  c.objective.method = "baseline"
  c.objective.bits = (int(a["bits"][3:]),)
  return c
