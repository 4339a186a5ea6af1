"""`python -m matquant_jax.sample` end to end on a tiny checkpoint and a KJV tokenizer."""

from __future__ import annotations

import gzip
import itertools
import os
import pathlib
import subprocess
import sys

import jax

from matquant_jax.checkpoints.matquant_checkpoint import export_matquant_checkpoint
from matquant_jax.data import train_tokenizer
from matquant_jax.models import get_config
from matquant_jax.models import init_params

_REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = os.environ["MATQUANT_TEST_CPU_FLAGS"]  # one CPU device, fast compiles
  return subprocess.run([sys.executable, "-m", "matquant_jax.sample", *args], cwd=_REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_sample_cli_end_to_end(tmp_path):
  with gzip.open(_REPO / "data" / "kjv.txt.gz", "rt", encoding="utf-8") as fh:
    lines = [line for line in itertools.islice(fh, 2000) if line.strip()]
  train_tokenizer(lines, tmp_path / "tokenizer", vocab_size=512, family="gemma")
  config = get_config("tiny_gemma2")
  ckpt = export_matquant_checkpoint(tmp_path / "export", config,
                                    init_params(config, jax.random.key(0, impl="rbg")),
                                    scope="ffn")
  # The tokenizer is found at <checkpoint>/../tokenizer.model; a batch of two prompts, sampled.
  proc = _run(f"--checkpoint={ckpt}", "--plan=ffn:int2", "--prompt=In the beginning",
              "--prompt=And God said", "--max_new_tokens=6", "--temperature=0.7", "--top_k=20",
              "--top_p=0.9", "--nowarmup")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout.splitlines()
  assert out[0].startswith("In the beginning") and out[2].startswith("And God said")
  speed = next(line for line in out if line.startswith("plan ffn:int2"))
  assert "tokens/s" in speed and "(bfloat16, cpu)" in speed
  memory = next(line for line in out if line.startswith("resident weights"))
  assert "MiB" in memory and "sum of live arrays" in memory
