"""Single Precision MatQuant QAT (Table 5/22-25 "SP"): loss on the int2 slice of an int8
parameterization only, λ = (0, 0, 1).

arg: gemma2_2b | gemma2_9b | mistral_7b.
"""

from matquant_jax.training.config import paper_qat_config, parse_config_arg


def get_config(arg="gemma2_9b"):
  a = parse_config_arg(arg, ("model",))
  c = paper_qat_config(a["model"])
  c.objective.method = "single_precision"
  return c
