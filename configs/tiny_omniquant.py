"""Tiny OmniQuant-MatQuant calibration on the bundled KJV text: a Gemma-2-architecture model
(tiny_gemma2: 4 layers, d=64), R = {8, 4, 2} with λ = (0.1, 0.1, 1), LWC + LET with the shift,
200 steps per block at OmniQuant's learning rates (LWC 1e-2, LET 5e-3), each width's error
divided by its MinMax error. About a minute on a laptop CPU.

    python -m matquant_jax.calibrate --config=configs/tiny_omniquant.py

From random init the weights are Gaussian. Measured (block error as a fraction of the block's
signal, mean over the 4 blocks; MinMax -> calibrated): int8 4.9e-5 -> 5.3e-5 (OmniQuant's
initial clipping, sigma(4), starts it at 1.2e-4), int4 1.45e-2 -> 1.31e-2, int2 0.233 -> 0.206.
Why the normalization: the raw errors of the widths differ by
~4^(8-r), so with the paper's literal loss (--config.calibration.loss_normalization=none) the
int8 term weighs ~1e-4 of the int2 term, and the shared clipping moves to where int2 wants it:
at lr 2e-2 int2 falls to 0.165 while int8 grows 400x to 2.0e-2, worse than MinMax int4.
Calibrate a trained model instead with --config.init=run:<workdir of a tiny QAT/bf16 run>
--config.tokenizer=run:<same workdir>.
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
  c.calibration.lr = 1e-2
  c.calibration.lwc_lr = 1e-2             # OmniQuant's code
  c.calibration.let_lr = 5e-3
  c.calibration.let = "scale_shift"
  c.calibration.loss_normalization = "minmax"
  c.calibration.compute_dtype = "float32"  # XLA on CPU emulates bf16 slowly
  c.log_every_steps = 50
  return c
