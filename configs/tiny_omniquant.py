"""Tiny OmniQuant-MatQuant calibration on the bundled KJV text: a Gemma-2-architecture model
(tiny_gemma2: 4 layers, d=64), R = {8, 4, 2} with λ = (0.1, 0.1, 1), LWC + scale-only LET,
200 steps per block at lr 2e-2 (the paper's 1e-3 needs its ~1,200 steps and more). About a
minute on a laptop CPU.

    python -m matquant_jax.calibrate --config=configs/tiny_omniquant.py

From random init the weights are Gaussian, which already shows the method: the int2 block
reconstruction error drops by about a quarter below MinMax while int8 gives up a little
(λ8 = 0.1). Calibrate a trained model instead with
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
  c.calibration.lr = 2e-2                 # tiny blocks converge in a few hundred steps
  c.calibration.compute_dtype = "float32"  # XLA on CPU emulates bf16 slowly
  c.log_every_steps = 50
  return c
