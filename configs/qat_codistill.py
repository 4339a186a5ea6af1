"""MatQuant QAT with co-distillation (Table 4 / 19), Gemma-2 9B in the paper.

arg: <model>,<variant> with variant one of
  8-4-8to2       [8,4,8→2]      int2 trained on int8's output only
  8-4-2-8to2     [8,4,2,8→2]    int2: ground truth + distillation from int8
  8-4-2-8to4_2   [8,4,2,8→4;2]  int4 and int2: ground truth + distillation from int8
Add --config.objective.method=extra_precision --config.objective.weights=(1.,1.,1.) for the
Extra Precision variants (Table 8 / 29).
"""

from matquant_jax.training.config import paper_qat_config, parse_config_arg

VARIANTS = {"8-4-8to2": "[8,4,8->2]", "8-4-2-8to2": "[8,4,2,8->2]",
            "8-4-2-8to4_2": "[8,4,2,8->4;2]"}


def get_config(arg="gemma2_9b,8-4-2-8to2"):
  a = parse_config_arg(arg, ("model", "variant"))
  if a["variant"] not in VARIANTS:
    raise ValueError(f"co-distillation variant {a['variant']!r}; choose one of {sorted(VARIANTS)}.")
  c = paper_qat_config(a["model"])
  c.objective.method = "matquant"
  c.objective.codistill = VARIANTS[a["variant"]]
  return c
