"""Command line: an int8 MatQuant checkpoint, sliced to a plan, back to a Hugging Face directory.

    python -m matquant_jax.export_hf --checkpoint=runs/my_llama/export --plan=ffn:int2 \
        --out=exports/my_llama_int2 [--tokenizer=auto] [--model_type=auto] [--dtype=bfloat16]

Writes config.json + model.safetensors that `transformers.AutoModelForCausalLM.from_pretrained`
loads: the plan's dequantized weights ((q − z)·α of each slice), stored in bf16 by default;
--dtype=float32 stores exactly the values matquant_jax computes. The tokenizer's files
(tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json or a
SentencePiece tokenizer.model) are copied next to the weights. The model type is taken from the
original checkpoint's config.json when the training run kept it (init=hf:<dir> runs copy it
with the tokenizer), else from the architecture (gemma2, llama when the name says so, mistral).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

from typing import Sequence

from absl import flags

from matquant_jax import cli

PROG = "export_hf"
# Its own FlagValues (cli.parse_flags): importing export_hf for the library function must not
# add --out, --plan, ... to absl's global flags, which other commands' names would clash with.
FLAGS = flags.FlagValues()
_F = dict(flag_values=FLAGS)
flags.DEFINE_string("checkpoint", None, "int8 MatQuant export directory.", **_F)
flags.DEFINE_string("plan", "ffn:int4", "Precision plan to slice to (e.g. ffn:int2).", **_F)
flags.DEFINE_string("out", None, "Output directory (created).", **_F)
flags.DEFINE_string("tokenizer", "auto", "Tokenizer file to copy; 'auto' finds it next to the "
                    "checkpoint; 'none' copies nothing.", **_F)
flags.DEFINE_enum("model_type", "auto", ["auto", "gemma2", "llama", "mistral"],
                  "HF model_type of the output.", **_F)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored dtype.", **_F)
flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint in --out.", **_F)


def copy_tokenizer_files(tokenizer_file: pathlib.Path, out: pathlib.Path) -> list[str]:
  """Copies a tokenizer (and its HF side files, but not the model's config.json) into `out`."""
  from matquant_jax.data import tokenizer as tokenizer_lib
  copied = []
  names = ((tokenizer_lib.SENTENCEPIECE_FILE,) if tokenizer_file.suffix == ".model"
           else tokenizer_lib.HF_TOKENIZER_FILES)
  for name in names:
    src = tokenizer_file if name == tokenizer_file.name else tokenizer_file.parent / name
    if name == "config.json" or not src.is_file():
      continue
    shutil.copyfile(src, out / name)
    copied.append(name)
  return copied


def original_model_type(tokenizer_file: pathlib.Path | None) -> str | None:
  """The model_type of the checkpoint a run started from, when its config.json was kept."""
  if tokenizer_file is None:
    return None
  cfg = tokenizer_file.parent / "config.json"
  if not cfg.is_file():
    return None
  try:
    value = json.loads(cfg.read_text()).get("model_type")
  except ValueError:
    return None
  return value if value in ("gemma2", "llama", "mistral") else None


def export_hf(checkpoint: str | pathlib.Path, plan, out: str | pathlib.Path, *,
              tokenizer: str | pathlib.Path | None = "auto", model_type: str | None = None,
              dtype: str = "bfloat16", overwrite: bool = False) -> pathlib.Path:
  """Writes the `plan` slice of an int8 MatQuant checkpoint as an HF directory; returns it."""
  import jax.numpy as jnp
  from matquant_jax.checkpoints import _common
  from matquant_jax.checkpoints import save_hf_checkpoint
  from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
  from matquant_jax.data import tokenizer as tokenizer_lib
  from matquant_jax.quant.plan import PrecisionPlan
  checkpoint, out = pathlib.Path(checkpoint), pathlib.Path(out)
  plan = PrecisionPlan.parse(plan) if isinstance(plan, str) else plan
  ckpt = MatQuantCheckpoint.load(checkpoint)
  _common.check_bias_free(ckpt.config, "Hugging Face safetensors")
  ckpt.check_plan(plan)
  tok_file = None
  if tokenizer == "auto":
    tok_file = tokenizer_lib.find_tokenizer(checkpoint)
  elif tokenizer not in (None, "none"):
    tok_file = pathlib.Path(tokenizer)
    if tok_file.is_dir():
      tok_file = tokenizer_lib.find_tokenizer(tok_file)
    if not tok_file.is_file():
      raise FileNotFoundError(f"tokenizer {tok_file} does not exist.")
  compute = jnp.float32 if dtype == "float32" else jnp.bfloat16
  params = ckpt.params_for(plan, dtype=compute)
  model_type = model_type or original_model_type(tok_file)
  save_hf_checkpoint(out, ckpt.config, params, dtype=dtype, overwrite=overwrite,
                     model_type=model_type)
  if tok_file is not None:
    copy_tokenizer_files(tok_file, out)
  (out / "matquant_plan.json").write_text(json.dumps(
      {"source": str(checkpoint.absolute()), "plan": str(plan),
       "effective_bits": ckpt.effective_bits(plan)}, indent=2) + "\n")
  return out


def main(argv: Sequence[str] | None = None) -> int:
  cli.parse_flags(FLAGS, argv, PROG)
  f = FLAGS
  if not f.checkpoint or not f.out:
    cli.fail(PROG, "pass --checkpoint=<int8 MatQuant export dir> and --out=<new dir>.")
  if not pathlib.Path(f.checkpoint).is_dir():
    cli.fail(PROG, f"--checkpoint={f.checkpoint}: no such directory.")
  try:
    out = export_hf(f.checkpoint, f.plan, f.out, tokenizer=f.tokenizer,
                    model_type=None if f.model_type == "auto" else f.model_type,
                    dtype=f.dtype, overwrite=f.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    return cli.error(PROG, str(e))
  print(f"wrote {out} ({f.plan}, {f.dtype}): {sorted(p.name for p in out.iterdir())}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
