"""OmniQuant MatQuant with co-distillation (spec §4, Tables 4/18; Gemma-2 9B in the paper).

arg: <model>,<variant> with variant one of
  8-4-8to2       [8,4,8→2]      int2 pulled toward int8's block output only
  8-4-2-8to2     [8,4,2,8→2]    int2: full-precision target + int8's block output
  8-4-2-8to4_2   [8,4,2,8→4;2]  int4 and int2: both targets (the paper's best int2, 64.32)
Budget 8.3M tokens per block. The distillation term is the L2 distance to the int8-sliced
block output (gradient stopped), weighted like the ground-truth term. Add
--config.objective.method=extra_precision for the E.P. variants (Tables 8/29; λ = (1, 1, 1)).
"""

from matquant_jax.calibration.config import paper_omniquant_config, parse_config_arg

VARIANTS = {"8-4-8to2": "[8,4,8->2]", "8-4-2-8to2": "[8,4,2,8->2]",
            "8-4-2-8to4_2": "[8,4,2,8->4;2]"}


def get_config(arg="gemma2_9b,8-4-2-8to4_2"):
  a = parse_config_arg(arg, ("model", "variant"))
  if a["variant"] not in VARIANTS:
    raise ValueError(f"co-distillation variant {a['variant']!r}; choose one of "
                     f"{sorted(VARIANTS)}.")
  c = paper_omniquant_config(a["model"])
  c.objective.method = "matquant"
  c.objective.codistill = VARIANTS[a["variant"]]
  return c
