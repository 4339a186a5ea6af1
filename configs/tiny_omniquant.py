"""Tiny OmniQuant-MatQuant calibration on the bundled KJV text: a Gemma-2-architecture model
(tiny_gemma2: 4 layers, d=64), R = {8, 4, 2} with λ = (0.1, 0.1, 1), LWC + scale-only LET.
About a minute on a laptop CPU.

    python -m matquant_jax.calibrate --config=configs/tiny_omniquant.py

From random init the weights are Gaussian, which already shows the method (int2 MinMax error
falls severalfold with learned clipping). Calibrate a trained model instead with
--config.init=run:<workdir of a tiny QAT/bf16 run> --config.tokenizer=run:<same workdir>.
"""

from matquant_jax.calibration.config import default_config


def get_config():
  c = default_config()
  c.model = "tiny_gemma2"
  c.tokenizer = "train:512"
  c.data.source = "kjv"
  c.data.num_samples = 32
  c.data.seq_len = 128
  c.calibration.batch_size = 4
  c.calibration.steps_per_block = 200     # 25 epochs over the 32 samples
  c.calibration.lr = 5e-3                 # tiny blocks converge in a few hundred steps
  c.calibration.compute_dtype = "float32"  # XLA on CPU emulates bf16 slowly
  c.log_every_steps = 50
  return c
