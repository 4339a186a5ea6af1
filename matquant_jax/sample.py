"""Command line: sample from an int8 MatQuant checkpoint served at any precision plan.

    python -m matquant_jax.sample --checkpoint=runs/tiny/export --plan=ffn:int2 \
        --prompt="In the beginning" [--tokenizer=<path>] [--max_new_tokens=64] \
        [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0] [--dtype=bfloat16] [--kernel=auto]

The checkpoint is streamed into packed serving weights for the plan (matquant_jax.serving), so
the int2 model holds a quarter of the int8 model's kernel bytes. Prints the generated text, the
decode speed and the model's resident weight memory. The tokenizer defaults to
<checkpoint>/../tokenizer.model (where the training run's export puts it).

Tokens/s is measured on a second, identical generation, after the first one compiled the
sampler (the compile time is printed separately); pass --nowarmup to time the first call.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "int8 MatQuant checkpoint directory.")
_PLAN = flags.DEFINE_string("plan", "ffn:int4", "Precision plan, e.g. ffn:int2, ffn:int4:ep, "
                            "ffn+attn:int4, ffn:pyramid@3.0, bf16.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model (default: "
                                 "<checkpoint>/../tokenizer.model).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Most tokens generated per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
_KERNEL = flags.DEFINE_enum("kernel", "auto", ["auto", "xla_int4", "xla_u8", "xla_unpack",
                                                "pallas_gpu", "pallas_tpu"],
                            "Matmul path for packed kernels (auto = the guard's choice).")
_FORMAT = flags.DEFINE_enum("format", "auto", ["auto", "planes", "u8", "int4"],
                            "Storage format of packed kernels (matquant_jax/serving/layouts.py).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Time a second generation after a compiling one.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f} MiB"


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every array it restores at INFO
  import jax
  import jax.numpy as jnp
  import numpy as np

  from matquant_jax.data.tokenizer import Tokenizer
  from matquant_jax.serving import loader

  if not _CHECKPOINT.value:
    print("error: pass --checkpoint=<int8 MatQuant checkpoint dir>", file=sys.stderr)
    return 2
  if not _PROMPT.value:
    print("error: pass --prompt=\"...\"", file=sys.stderr)
    return 2
  ckpt = pathlib.Path(_CHECKPOINT.value)
  tok_path = pathlib.Path(_TOKENIZER.value) if _TOKENIZER.value else (
      ckpt.absolute().parent / "tokenizer.model")
  if not tok_path.exists():
    print(f"error: tokenizer {tok_path} does not exist; pass --tokenizer=<path to a "
          f"SentencePiece .model>.", file=sys.stderr)
    return 2
  dtype = jnp.dtype(_DTYPE.value)
  try:
    t0 = time.perf_counter()
    model = loader.load_serving(ckpt, _PLAN.value, dtype=dtype, fmt=_FORMAT.value)
    load_s = time.perf_counter() - t0
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if _KERNEL.value != "auto":
    model = model.with_path(_KERNEL.value)  # kernels of other formats keep the guard's path
  tokenizer = Tokenizer.from_file(tok_path)
  if tokenizer.vocab_size > model.config.vocab_size:
    print(f"error: the tokenizer has {tokenizer.vocab_size} pieces but the model only "
          f"{model.config.vocab_size}; pass the tokenizer the model was trained with.",
          file=sys.stderr)
    return 2

  encoded = [tokenizer.encode(p) for p in _PROMPT.value]
  length = max(len(e) for e in encoded)
  prompts = np.full((len(encoded), length), model.config.pad_id, np.int32)
  for i, e in enumerate(encoded):
    prompts[i, :len(e)] = e
  lengths = np.array([len(e) for e in encoded], np.int32)
  kwargs = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                top_p=_TOP_P.value, rng=jax.random.key(_SEED.value),
                eos_ids=tokenizer.stop_ids)

  def run():
    t = time.perf_counter()
    out = model.generate(prompts, lengths, **kwargs)
    jax.block_until_ready(out.tokens)
    return out, time.perf_counter() - t

  try:
    out, first_s = run()
  except ValueError as e:  # e.g. a forced --kernel that cannot run these shapes
    print(f"error: {e}", file=sys.stderr)
    return 2
  timed_s = first_s
  if _WARMUP.value:
    out, timed_s = run()
  tokens = np.asarray(out.tokens)
  generated = np.asarray(out.lengths)
  texts = [tokenizer.decode([int(t) for t in row[:n] if int(t) not in tokenizer.stop_ids])
           for row, n in zip(tokens, generated)]
  weight_bytes = model.weight_bytes()
  memory = loader.memory_report(model.params)
  summary = {
      "plan": str(model.plan),
      "dtype": dtype.name,
      "backend": jax.default_backend(),
      "load_s": round(load_s, 3),
      "compile_and_first_run_s": round(first_s, 3),
      "generated_tokens": int(generated.sum()),
      "tokens_per_s": round(float(generated.sum()) / timed_s, 2) if timed_s > 0 else None,
      "weight_bytes": weight_bytes,
      "device_memory": memory,
  }
  if _JSON.value:
    print(json.dumps({"texts": texts, **summary}, indent=2))
    return 0
  for prompt, text in zip(_PROMPT.value, texts):
    print(f"{prompt}{text}")
    print()
  print(f"plan {summary['plan']} ({dtype.name}, {summary['backend']}): "
        f"{summary['generated_tokens']} tokens, {summary['tokens_per_s']} tokens/s "
        f"(compile + first run {first_s:.2f} s)")
  print(f"resident weights: {_mib(weight_bytes['total'])} (quantized kernels "
        f"{_mib(weight_bytes['quantized_kernels'])}, float params {_mib(weight_bytes['float'])}); "
        f"device bytes in use {_mib(memory['bytes_in_use'])} "
        f"({'allocator stats' if memory['source'] == 'memory_stats' else 'sum of live arrays'})")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
