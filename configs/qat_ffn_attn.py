"""QAT of FFN + Attention (Table 6 / 20-21): 300M C4 tokens, batch 16, one epoch.

arg: <model>,<method> with method matquant | single_precision | int8 | int6 | int4 | int3 | int2
(the last five are baselines; the paper's int3/int2 baselines diverge).
"""

from matquant_jax.training.config import paper_qat_config, parse_config_arg


def get_config(arg="gemma2_9b,matquant"):
  a = parse_config_arg(arg, ("model", "method"))
  c = paper_qat_config(a["model"], ffn_attn=True)
  m = a["method"]
  if m in ("matquant", "single_precision"):
    c.objective.method = m
  elif m in ("int8", "int6", "int4", "int3", "int2"):
    c.objective.method = "baseline"
    c.objective.bits = (int(m[3:]),)
  else:
    raise ValueError(f"method {m!r}: use matquant, single_precision or int8/6/4/3/2.")
  return c
