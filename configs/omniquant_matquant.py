"""OmniQuant-based MatQuant (Table 1 "MQ" rows): R = {8, 4, 2}, one int8 model whose int4 and
int2 slices (and int6, int3 by slicing) are calibrated together.

    python -m matquant_jax.calibrate --config=configs/omniquant_matquant.py:gemma2_9b \
        --config.init=gemma:/ckpts/gemma2-9b --config.tokenizer=/ckpts/tokenizer.model

arg: gemma2_2b | gemma2_9b | mistral_7b. λ = (0.1, 0.1, 1) for Gemma, (0.4, 0.4, 1) for
Mistral; 128 × 2048 C4 tokens, batch 4, 10M tokens per block (1,221 steps). OmniQuant's
procedure (calibration.paper_omniquant_config): quantized input stream per width, constant
LWC lr 1e-2 and LET lr 5e-3 (the paper's literal 1e-3: --config.calibration.lwc_lr=1e-3
--config.calibration.let_lr=1e-3).
"""

from matquant_jax.calibration.config import paper_omniquant_config, parse_config_arg


def get_config(arg="gemma2_9b"):
  a = parse_config_arg(arg, ("model",))
  c = paper_omniquant_config(a["model"])
  c.objective.method = "matquant"
  return c
