"""Single Precision MatQuant with OmniQuant (spec §5.1, Tables 5/22/23/25): only the int2 slice
of an int8 parameterization is calibrated (R = {2}, λ = (1,)).

arg: gemma2_2b | gemma2_9b | mistral_7b. Add --config.objective.extra_precision=True for the
S.P. + E.P. rows of Table 30.
"""

from matquant_jax.calibration.config import paper_omniquant_config, parse_config_arg


def get_config(arg="gemma2_9b"):
  a = parse_config_arg(arg, ("model",))
  c = paper_omniquant_config(a["model"])
  c.objective.method = "single_precision"
  return c
