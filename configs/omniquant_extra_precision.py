"""Extra Precision MatQuant with OmniQuant (spec §5.2, Tables 7/26-28): unclamped slices (the
extra bucket), R = {8, 4, 2}, λ = (1, 1, 1).

arg: gemma2_2b | gemma2_9b | mistral_7b. Evaluate with plans carrying ':ep' (e.g. ffn:int2:ep).
"""

from matquant_jax.calibration.config import paper_omniquant_config, parse_config_arg


def get_config(arg="gemma2_9b"):
  a = parse_config_arg(arg, ("model",))
  c = paper_omniquant_config(a["model"])
  c.objective.method = "extra_precision"
  return c
