"""MatQuant QAT, FFN only, R = {8, 4, 2} (Table 2 "MQ" rows; int6/int3 come from slicing).

    python -m matquant_jax.train --config=configs/qat_matquant.py:gemma2_9b \
        --config.init=gemma:/ckpts/gemma2-9b --config.tokenizer=/ckpts/tokenizer.model

arg: gemma2_2b | gemma2_9b | mistral_7b. λ = (0.1, 0.1, 1) for Gemma, (0.2, 0.2, 1) for Mistral.
"""

from matquant_jax.training.config import paper_qat_config, parse_config_arg


def get_config(arg="gemma2_9b"):
  a = parse_config_arg(arg, ("model",))
  c = paper_qat_config(a["model"])
  c.objective.method = "matquant"
  return c
