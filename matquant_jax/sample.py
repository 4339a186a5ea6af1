"""Command line: sample from any checkpoint at any precision plan.

    python -m matquant_jax.sample --checkpoint=runs/tiny/export --plan=ffn:int2 \
        --prompt="In the beginning" [--tokenizer=<path>|auto] [--max_new_tokens=64] \
        [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0] [--dtype=bfloat16] [--kernel=auto]
    python -m matquant_jax.sample --checkpoint=hf:/ckpts/SmolLM2-135M --plan=ffn:int4 \
        --prompt="What is a bit?" --chat

Two kinds of checkpoint:
  * an int8 MatQuant export (a directory written by the train/calibrate commands): it is
    streamed into packed serving weights for the plan (matquant_jax.serving), so the int2 model
    holds a quarter of the int8 model's kernel bytes;
  * a float checkpoint, `hf:<dir>`, `gemma:<dir>[:<preset>]`, `mistral:<dir>` or
    `run:<workdir>`: the plan's kernels are quantized on the fly by MinMax, the paper's
    post-training baseline. A uniform plan `ffn:intR` uses MinMax(R) itself; a per-layer plan
    (Mix'n'Match) or an explicit `:parent=8` slices MinMax int8 codes.

Prints the generated text, the decode speed and the model's resident weight memory. The
tokenizer ('auto', the default) is the tokenizer.model or tokenizer.json next to the checkpoint
(or in its parent, where a training run keeps it). `--chat` wraps each prompt in the
tokenizer's chat template (tokenizer_config.json's, or the family's for SentencePiece models).
Every argument and file is checked before the model is loaded.

From Python, `load_model(...)` and `generate_ids(model, [[ids...]], ...)` take and return token
ids.

Tokens/s is measured on a second, identical generation, after the first one compiled the
sampler (the compile time is printed separately); pass --nowarmup to time the first call.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Sequence

from absl import flags
from absl import logging

from matquant_jax import cli

FLAGS = flags.FlagValues()  # this command's own flags (cli.parse_flags)
_F = dict(flag_values=FLAGS)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "int8 MatQuant export directory, or a float checkpoint: hf:<dir>, "
    "gemma:<dir>[:<preset>], mistral:<dir>, run:<workdir>.", **_F)
_PLAN = flags.DEFINE_string("plan", "ffn:int4", "Precision plan, e.g. ffn:int2, ffn:int4:ep, "
                            "ffn+attn:int4, ffn:pyramid@3.0, bf16.", **_F)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).", **_F)
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt as a user turn of the tokenizer's "
                          "chat template.", **_F)
_TOKENIZER = flags.DEFINE_string("tokenizer", "auto", "SentencePiece .model or HF "
                                 "tokenizer.json; 'auto' finds it next to the checkpoint.", **_F)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Most tokens generated per prompt.", **_F)
_MAX_LENGTH = flags.DEFINE_integer(
    "max_length", 8192, "Most tokens (prompt + generated) per row; sizes the KV cache. 8192 is "
    "Gemma-2's context; raise it for models trained on longer contexts.", **_F)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.", **_F)
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.", **_F)
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass.", **_F)
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.", **_F)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.", **_F)
_KERNEL = flags.DEFINE_enum("kernel", "auto", ["auto", "xla_int4", "xla_u8", "xla_unpack",
                                                "pallas_gpu", "pallas_tpu"],
                            "Matmul path for packed kernels (auto = the guard's choice).", **_F)
_FORMAT = flags.DEFINE_enum("format", "auto", ["auto", "planes", "u8", "int4"],
                            "Storage format of packed kernels (matquant_jax/serving/layouts.py).",
                            **_F)
_WARMUP = flags.DEFINE_bool("warmup", True, "Time a second generation after a compiling one.",
                            **_F)
_ALLOW_CLAMPED = flags.DEFINE_bool(
    "allow_clamped", False, "Serve clamped slices of a checkpoint trained with Extra Precision "
    "(refused by default: add ':ep' to the plan instead).", **_F)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.", **_F)

PROG = "sample"
_FLOAT_KINDS = ("hf", "gemma", "mistral", "run")


def is_float_source(checkpoint: str) -> bool:
  """Whether --checkpoint names float weights (a weight source) rather than an int8 export."""
  kind, sep, _ = checkpoint.partition(":")
  return bool(sep) and kind in _FLOAT_KINDS


class UsageError(ValueError):
  """A bad argument or file, reported as one line before anything heavy happens."""


@dataclasses.dataclass(frozen=True)
class Request:
  """Everything `main` needs, validated."""
  checkpoint: str
  float_source: Any          # weight_source.WeightSource for float checkpoints, else None
  plan: Any                  # PrecisionPlan
  tokenizer_path: pathlib.Path


def float_plan(plan):
  """The plan a float checkpoint is served at: a uniform plan without an explicit parent
  quantizes with MinMax at its own width (the paper's MinMax(r) baseline); a plan string with
  ':parent=N' keeps its parent."""
  from matquant_jax.quant.plan import PrecisionPlan, Strategy
  if isinstance(plan, str):
    explicit = "parent=" in plan.replace(" ", "").lower()
    plan = PrecisionPlan.parse(plan)
    if explicit:
      return plan
  if plan.strategy is Strategy.UNIFORM and plan.bits is not None and plan.parent_bits == 8:
    return PrecisionPlan.uniform(plan.bits, plan.scope, extra_precision=plan.extra_precision,
                                 parent_bits=plan.bits)
  return plan


def check_request(checkpoint: str | None, plan_text: str, prompts: Sequence[str] | None,
                  tokenizer: str, max_new_tokens: int, max_length: int, temperature: float,
                  top_k: int | None, top_p: float | None) -> Request:
  """Validates the arguments and files; raises UsageError naming the problem and the fix."""
  from matquant_jax.checkpoints import weight_source
  from matquant_jax.data import tokenizer as tokenizer_lib
  from matquant_jax.quant.plan import PrecisionPlan
  if not checkpoint:
    raise UsageError("pass --checkpoint=<int8 MatQuant export dir> or hf:<dir> (also gemma:, "
                     "mistral:, run:).")
  if not prompts:
    raise UsageError('pass --prompt="..." (repeat it for a batch).')
  empty = [i for i, p in enumerate(prompts) if not p.strip()]
  if empty:
    raise UsageError(f"prompt {empty[0] + 1} is empty; give every --prompt some text.")
  if max_new_tokens < 1:
    raise UsageError(f"--max_new_tokens={max_new_tokens} must be >= 1.")
  if max_length < 2:
    raise UsageError(f"--max_length={max_length} must be >= 2.")
  if max_new_tokens >= max_length:
    raise UsageError(f"--max_new_tokens={max_new_tokens} leaves no room for the prompt within "
                     f"--max_length={max_length} tokens (the KV cache size); lower it, or raise "
                     f"--max_length if the model was trained on longer contexts.")
  if temperature < 0:
    raise UsageError(f"--temperature={temperature} must be >= 0 (0 = greedy).")
  if top_k is not None and top_k < 1:
    raise UsageError(f"--top_k={top_k} must be >= 1.")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise UsageError(f"--top_p={top_p} must be in (0, 1].")
  try:
    plan = PrecisionPlan.parse(plan_text)
  except ValueError as e:
    raise UsageError(f"--plan={plan_text!r}: {e}") from None
  source = None
  if is_float_source(checkpoint):
    try:
      source = weight_source.parse(checkpoint)
      weight_source.architecture(source)  # config problems before any tensor is read
    except (ValueError, FileNotFoundError) as e:
      raise UsageError(f"--checkpoint={checkpoint}: {e}") from None
    plan = float_plan(plan_text)
    ckpt_dir = source.path
  else:
    ckpt_dir = pathlib.Path(checkpoint)
    if not ckpt_dir.is_dir():
      raise UsageError(f"--checkpoint={checkpoint}: no such directory. Give an int8 MatQuant "
                       f"export directory, or a float checkpoint as hf:<dir> (gemma:, "
                       f"mistral:, run:).")
  try:
    tok_path = (tokenizer_lib.find_tokenizer(ckpt_dir) if tokenizer == "auto"
                else pathlib.Path(tokenizer))
    if not tok_path.exists():
      raise FileNotFoundError(f"tokenizer {tok_path} does not exist.")
  except FileNotFoundError as e:
    raise UsageError(f"--tokenizer={tokenizer}: {e}") from None
  return Request(checkpoint, source, plan, tok_path)


def load_model(checkpoint: str, plan, *, dtype=None, fmt: str = "auto",
               allow_clamped: bool = False):
  """A ServingModel for `checkpoint` (int8 export dir, or hf:/gemma:/mistral:/run: float
  weights quantized on the fly) at `plan`: a plan string (for float weights read as
  `float_plan` does) or a PrecisionPlan, used as given."""
  import jax.numpy as jnp
  from matquant_jax.checkpoints import weight_source
  from matquant_jax.quant.plan import PrecisionPlan
  from matquant_jax.serving import loader
  dtype = jnp.bfloat16 if dtype is None else dtype
  if is_float_source(checkpoint):
    import jax
    import numpy as np
    source = weight_source.parse(checkpoint)
    config, params = weight_source.load(source)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x), dtype), params)
    plan = float_plan(plan) if isinstance(plan, str) else plan
    return loader.ServingModel(config=config, plan=plan, params=params, dtype=dtype,
                               source=source.path)
  plan = PrecisionPlan.parse(plan) if isinstance(plan, str) else plan
  return loader.load_serving(pathlib.Path(checkpoint), plan, dtype=dtype, fmt=fmt,
                             allow_clamped=allow_clamped)


def generate_ids(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 eos_ids: Sequence[int] | None = None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0
                 ) -> list[list[int]]:
  """Token ids in, token ids out: the generated ids of each prompt (stop tokens dropped)."""
  import jax
  import numpy as np
  if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
    raise ValueError("every prompt needs at least one token id.")
  length = max(len(p) for p in prompt_ids)
  prompts = np.full((len(prompt_ids), length), model.config.pad_id, np.int32)
  for i, p in enumerate(prompt_ids):
    prompts[i, :len(p)] = p
  lengths = np.array([len(p) for p in prompt_ids], np.int32)
  eos = tuple(eos_ids) if eos_ids is not None else (model.config.eos_id,)
  out = model.generate(prompts, lengths, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, rng=jax.random.key(seed), eos_ids=eos)
  tokens, generated = np.asarray(out.tokens), np.asarray(out.lengths)
  return [[int(t) for t in row[:n] if int(t) not in eos] for row, n in zip(tokens, generated)]


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
  """Samples from a checkpoint at a plan (module docstring).

  Long: the command's steps in order (validate, load, generate, report), each with its error.
  """
  cli.parse_flags(FLAGS, argv, PROG)
  logging.set_verbosity(logging.WARNING)  # orbax logs every array it restores at INFO
  import jax
  import jax.numpy as jnp
  import numpy as np

  from matquant_jax.data import tokenizer as tokenizer_lib
  from matquant_jax.serving import loader

  try:
    req = check_request(_CHECKPOINT.value, _PLAN.value, _PROMPT.value, _TOKENIZER.value,
                        _MAX_NEW.value, _MAX_LENGTH.value, _TEMPERATURE.value, _TOP_K.value,
                        _TOP_P.value)
    tokenizer = tokenizer_lib.open_tokenizer(req.tokenizer_path)
    texts_in = list(_PROMPT.value)
    if _CHAT.value:
      texts_in = [tokenizer.apply_chat_template([{"role": "user", "content": p}])
                  for p in texts_in]
    encoded = [tokenizer.encode(p) for p in texts_in]
  except (ValueError, FileNotFoundError) as e:
    return cli.error(PROG, e)
  longest = max(len(e) for e in encoded)
  if longest + _MAX_NEW.value > _MAX_LENGTH.value:
    return cli.error(PROG, f"the longest prompt has {longest} tokens; with --max_new_tokens="
                           f"{_MAX_NEW.value} that exceeds --max_length={_MAX_LENGTH.value}. "
                           f"Shorten the prompt or lower --max_new_tokens.")
  dtype = jnp.dtype(_DTYPE.value)
  try:
    t0 = time.perf_counter()
    model = load_model(req.checkpoint, req.plan, dtype=dtype, fmt=_FORMAT.value,
                       allow_clamped=_ALLOW_CLAMPED.value)
    load_s = time.perf_counter() - t0
  except (ValueError, FileNotFoundError) as e:
    return cli.error(PROG, e)
  if _KERNEL.value != "auto":
    model = model.with_path(_KERNEL.value)  # kernels of other formats keep the guard's path
  if tokenizer.vocab_size > model.config.vocab_size:
    return cli.error(PROG, f"the tokenizer has {tokenizer.vocab_size} pieces but the model "
                           f"only {model.config.vocab_size}; pass the tokenizer the model was "
                           f"trained with.")
  try:
    out, first_s, timed_s = _generate(model, encoded, tokenizer.stop_ids)
  except ValueError as e:  # e.g. a forced --kernel that cannot run these shapes
    return cli.error(PROG, e)
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
  else:
    _print_text(texts_in, texts, summary, first_s)
  return 0


def _generate(model, encoded: list[list[int]], stop_ids):
  """(output, seconds of the first run, seconds of the timed run) of the right-padded batch;
  with --warmup the second, already compiled, run is the timed one."""
  import jax
  import numpy as np
  length = max(len(e) for e in encoded)
  prompts = np.full((len(encoded), length), model.config.pad_id, np.int32)
  for i, e in enumerate(encoded):
    prompts[i, :len(e)] = e
  lengths = np.array([len(e) for e in encoded], np.int32)
  kwargs = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                top_p=_TOP_P.value, rng=jax.random.key(_SEED.value), eos_ids=stop_ids)

  def run():
    t = time.perf_counter()
    out = model.generate(prompts, lengths, **kwargs)
    jax.block_until_ready(out.tokens)
    return out, time.perf_counter() - t

  out, first_s = run()
  timed_s = first_s
  if _WARMUP.value:
    out, timed_s = run()
  return out, first_s, timed_s


def _print_text(texts_in, texts, summary: dict, first_s: float) -> None:
  weight_bytes, memory = summary["weight_bytes"], summary["device_memory"]
  for prompt, text in zip(texts_in, texts):
    print(f"{prompt}{text}")
    print()
  print(f"plan {summary['plan']} ({summary['dtype']}, {summary['backend']}): "
        f"{summary['generated_tokens']} tokens, {summary['tokens_per_s']} tokens/s "
        f"(compile + first run {first_s:.2f} s)")
  print(f"resident weights: {_mib(weight_bytes['total'])} (quantized kernels "
        f"{_mib(weight_bytes['quantized_kernels'])}, float params {_mib(weight_bytes['float'])}); "
        f"device bytes in use {_mib(memory['bytes_in_use'])} "
        f"({'allocator stats' if memory['source'] == 'memory_stats' else 'sum of live arrays'})")


if __name__ == "__main__":
  cli.run_main(main)
