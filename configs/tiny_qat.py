"""Tiny MatQuant QAT on the bundled KJV text: a Gemma-2-architecture model (4 layers, d=64),
R = {8, 4, 2} with λ = (0.1, 0.1, 1), a few minutes on a laptop CPU.

    python -m matquant_jax.train --config=configs/tiny_qat.py

From random init this shows the machinery (losses fall, int2 lags int8); the demo first
pretrains in bf16 and then starts QAT from it with --config.init=run:<pretrain workdir>.
"""

from matquant_jax.training.config import default_config


def get_config():
  c = default_config()
  c.model = "tiny_gemma2"
  c.tokenizer = "train:512"
  c.data.source = "kjv"
  c.data.seq_len = 128
  c.data.global_batch_size = 16
  c.data.num_epochs = 0          # repeat: the step count below decides
  c.data.max_tokens = 0
  c.num_steps = 300
  c.optimizer.peak_lr = 3e-3
  c.optimizer.warmup_steps = 30
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.grad_clip_norm = 1.0
  c.compute_dtype = "float32"    # XLA on CPU emulates bf16 slowly
  c.log_every_steps = 25
  c.checkpoint_every_steps = 100
  return c
