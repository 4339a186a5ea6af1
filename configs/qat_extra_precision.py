"""Extra Precision MatQuant QAT (Table 30 "EP"): unclamped slices, λ = (1, 1, 1).

arg: gemma2_2b | gemma2_9b | mistral_7b. Add --config.objective.bits=(2,) for "SP+EP".
"""

from matquant_jax.training.config import paper_qat_config, parse_config_arg


def get_config(arg="gemma2_9b"):
  a = parse_config_arg(arg, ("model",))
  c = paper_qat_config(a["model"])
  c.objective.method = "extra_precision"
  return c
