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

from absl import app
from absl import flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "int8 MatQuant export directory.")
_PLAN = flags.DEFINE_string("plan", "ffn:int4", "Precision plan to slice to (e.g. ffn:int2).")
_OUT = flags.DEFINE_string("out", None, "Output directory (created).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "auto", "Tokenizer file to copy; 'auto' finds "
                                 "it next to the checkpoint; 'none' copies nothing.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "auto", ["auto", "gemma2", "llama", "mistral"],
                                "HF model_type of the output.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint in --out.")


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


def main(argv) -> int:
  del argv
  if not _CHECKPOINT.value or not _OUT.value:
    print("error: pass --checkpoint=<int8 MatQuant export dir> and --out=<new dir>.",
          file=sys.stderr)
    return 2
  if not pathlib.Path(_CHECKPOINT.value).is_dir():
    print(f"error: --checkpoint={_CHECKPOINT.value}: no such directory.", file=sys.stderr)
    return 2
  try:
    out = export_hf(_CHECKPOINT.value, _PLAN.value, _OUT.value, tokenizer=_TOKENIZER.value,
                    model_type=None if _MODEL_TYPE.value == "auto" else _MODEL_TYPE.value,
                    dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out} ({_PLAN.value}, {_DTYPE.value}): "
        f"{sorted(p.name for p in out.iterdir())}")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
