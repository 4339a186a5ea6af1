"""Experiment configuration defaults (ml_collections), shared by every file in configs/.

Every field has a fixed type: `--config.field=value` overrides of the wrong type, and unknown
fields, are errors (ml_collections + absl config_flags), never silent defaults. Optional fields
are typed placeholders (None until set).

The defaults are the paper's QAT hyperparameters (spec §6) where it gives them: batch 16,
sequence 8192, linear warmup to 1e-5 over 150 steps then cosine decay, one epoch over a fixed
100M-token sample of C4 (763 steps). What it leaves open (optimizer, weight decay, final LR,
gradient clipping, whether non-quantized params train) are fields here with documented defaults.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
  """A configuration that cannot run; raised before anything is compiled (QAT and calibration)."""


def default_config() -> ml_collections.ConfigDict:
  """The QAT config every experiment starts from.

  Long: one line per config field with its documented default, the reference a reader scans.
  """
  c = ml_collections.ConfigDict()
  c.model = "gemma2_2b"          # a preset of models.config.PRESETS, or "auto" (init's own)
  # Where the starting weights come from: "random", "run:<workdir>" (the final params of an
  # earlier run, e.g. bf16 pretraining), "hf:<dir>" (HF safetensors), "gemma:<dir>" (official
  # Gemma Flax/Orbax), "mistral:<dir>" (consolidated.safetensors + params.json).
  c.init = "random"
  # A SentencePiece .model or HF tokenizer.json (or a directory with one), "auto" (the one next
  # to init's checkpoint), "train:<vocab_size>" to train one on the training text into the
  # workdir (tiny runs only), or "run:<workdir>" to reuse an earlier run's tokenizer.
  c.tokenizer = "train:512"
  c.seed = 0

  c.objective = ml_collections.ConfigDict()
  c.objective.method = "matquant"  # matquant | single_precision | extra_precision | baseline | bf16
  c.objective.bits = config_dict.placeholder(tuple)      # R, or (r,) for a baseline
  c.objective.weights = config_dict.placeholder(tuple)   # λ aligned with bits
  c.objective.codistill = ""       # e.g. "[8,4,2,8->2]" (spec §4)
  c.objective.scope = "ffn"        # ffn (paper default) | ffn+attn
  c.objective.extra_precision = config_dict.placeholder(bool)
  c.objective.distill_loss = "kl"  # kl | soft_ce | l2
  c.objective.stop_teacher_grad = True
  c.objective.family = "gemma"     # default λ: gemma (0.1, 0.1, 1) | mistral (0.2, 0.2, 1)
  # Whether parameters outside the quantized kernels (attention in FFN-only runs, embeddings,
  # norms) train too. The paper says QAT "updates all the model parameters": default "all".
  c.train_scope = "all"            # all | quantized

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds:c4/en"     # kjv | text:<path>[,<path>] | tfds:<name>
  c.data.tfds_data_dir = ""        # TFDS data_dir ("" = TFDS default)
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.seq_len = 8192
  c.data.global_batch_size = 16
  c.data.seed = 0
  c.data.num_epochs = 1            # 0 = repeat forever
  c.data.max_tokens = 100_000_000  # the fixed token sample (0 = no cap)
  c.data.add_bos = True
  c.data.add_eos = True
  # Logical data shards (0 = one per process). Each process reads num_shards / P of them and a
  # global batch is the same for every process count P dividing it: set it to the pod's
  # process count to reproduce (or resume) a multi-host run on fewer hosts.
  c.data.num_shards = 0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.peak_lr = 1e-5
  c.optimizer.warmup_steps = 150
  c.optimizer.final_lr_fraction = 0.0
  c.optimizer.weight_decay = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = config_dict.placeholder(float)

  # 0 = derive from the data budget: max_tokens / (global_batch_size * seq_len) per epoch.
  c.num_steps = 0
  c.compute_dtype = "bfloat16"     # activations; master weights are always float32
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1 = all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.run_name = ""                  # prefixes console lines (runs sharing one console)
  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 3
  c.export = True                  # write the int8 MatQuant checkpoint at the end
  c.aot_only = False               # lower + compile the train step, report memory, do not run
  # Compile for this TPU topology instead of the local devices (needs libtpu: the [tpu] extra;
  # any name jax.experimental.topologies accepts, e.g. "v5e:8x8"); with aot_only only.
  c.aot_topology = ""
  # Pod-scale memory: the decoder stack as one scanned layer group (params stacked inside the
  # train state; checkpoints read and written per layer), what its backward pass keeps
  # (none | dots | full, models/transformer.py REMAT_POLICIES), and the loss computed this
  # many sequence tokens at a time so [batch, seq, vocab] logits never exist (0 = at once).
  c.scan_layers = True
  c.remat = "none"
  c.loss_chunk_size = 1024
  # How attention runs in the train step: "xla" (einsums; the scores [B, N, T, T] exist in
  # memory), "splash" (the Pallas TPU kernel of models/splash_attention.py: sequence and head_dim
  # multiples of 128; interpreted, slowly, off TPU) or "auto" (splash when compiling for TPU and
  # the shapes allow it, else xla). Same numbers up to float rounding.
  c.attention_kernel = "auto"
  # How one step runs the objective's bit-widths: "scan" (one lax.scan over a traced width: one
  # compiled forward/backward for all widths) or "unrolled" (one traced program per width, in
  # Python order). Same numbers; they differ in speed and peak memory: the scan measured smaller
  # and faster everywhere so far (Gemma-2 9B MatQuant on v5e-64, quantizing the whole tree:
  # 8.41 vs 12.36 GiB per chip).
  c.width_loop = "scan"
  # Where a step fake-quantizes the kernels: "layers" (each layer quantizes its own kernels
  # inside the layer stack, so a scanned, remat'ed stack never holds every layer's quantized
  # kernels at once), "tree" (the whole param tree before the model runs), or "auto" (layers
  # when a step scans over several widths, else tree). Same numbers; they differ in peak memory
  # (per chip: Gemma-2 9B MatQuant on v5e-64 8.41 GiB with the tree, 7.47 with layers; Gemma-2
  # 2B on v5e-16: MatQuant 8.44 -> 8.33, but int2 QAT 6.73 -> 7.02, hence auto).
  c.fake_quant_at = "auto"
  # How a step sums its widths' gradients: "in_place" (the backward pass of the scanned layer
  # stack adds each layer group's gradient into the running f32 sum as soon as it exists:
  # transformer.accumulating_scan), "add" (each width's whole gradient, then a sum: two f32
  # gradient-sized buffers), or "auto" (in_place wherever it applies: a scan over several
  # widths with scan_layers, remat "full", fake_quant_at layers and the teacher's gradient
  # stopped; else add). Same numbers up to the order of float additions.
  c.accumulate_grads = "auto"
  # Device kind used for MFU when the backend's own name is not in the peak-FLOPs table.
  c.peak_flops_per_device = config_dict.placeholder(float)
  return c


# The paper's QAT models (spec §6-§7) and their λ family.
# "auto": the architecture of --config.init's checkpoint (a user's own model), λ family from
# its architecture (Gemma-style norms -> gemma, else mistral).
PAPER_MODELS = {"gemma2_2b": "gemma", "gemma2_9b": "gemma", "mistral_7b": "mistral",
                "auto": "auto"}
_PRESET_OF = {"gemma2_2b": "gemma2_2b", "gemma2_9b": "gemma2_9b", "mistral_7b": "mistral_7b_v0_1",
              "auto": "auto"}


def paper_qat_config(model: str, *, ffn_attn: bool = False) -> ml_collections.ConfigDict:
  """Spec §6 QAT on C4 for one of the paper's models; the caller picks the objective.

  The paper starts from the released weights, so `init` must be set on the command line
  (e.g. --config.init=gemma:/ckpts/gemma2-9b or hf:/ckpts/Mistral-7B-v0.1) together with the
  model's tokenizer (--config.tokenizer=/ckpts/tokenizer.model).
  """
  c = set_paper_model(default_config(), model)
  c.remat = "full"  # sequence 8192 on 16 GiB chips: keep only each layer group's input
  if ffn_attn:
    # FFN + Attention runs (spec §5.5): a fixed 300M-token sample, batch 16, one epoch.
    c.objective.scope = "ffn+attn"
    c.data.max_tokens = 300_000_000
  return c


def set_paper_model(c: ml_collections.ConfigDict, model: str) -> ml_collections.ConfigDict:
  """Points `c` (QAT or calibration) at one of the paper's models: its preset and λ family, with
  the released weights and tokenizer left as required command-line settings."""
  if model not in PAPER_MODELS:
    raise ValueError(f"unknown paper model {model!r}; choose one of {sorted(PAPER_MODELS)}.")
  c.model = _PRESET_OF[model]
  c.init = "required"
  c.tokenizer = "required"
  c.objective.family = PAPER_MODELS[model]
  return c


def parse_config_arg(arg: str | None, names: tuple[str, ...]) -> dict[str, str]:
  """'gemma2_9b,int4' -> {'model': 'gemma2_9b', 'bits': 'int4'} for `--config=file.py:arg`."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  if len(parts) != len(names):
    raise ValueError(f"config argument {arg!r} must be '{','.join(names)}' (e.g. "
                     f"--config=configs/<file>.py:{','.join(names)}).")
  return dict(zip(names, parts))


def check_inputs(config: ml_collections.ConfigDict, model) -> None:
  """Checks what a run (QAT or calibration) will read — config.init's weights, config.tokenizer,
  config.data.source — before it writes a file or compiles anything; raises ConfigError naming
  the field and the fix. `model` is the resolved TransformerConfig."""
  import pathlib
  from matquant_jax.checkpoints import weight_source
  from matquant_jax.data import sources
  from matquant_jax.data import tokenizer as tokenizer_lib
  if config.init != "random":
    try:
      src = weight_source.parse(config.init)
      if src.kind == "run" and not (src.path / "final_params").exists():
        raise FileNotFoundError(f"{src.path / 'final_params'} does not exist; run that job to "
                                f"the end first (it writes final_params when it finishes).")
      arch = weight_source.architecture(src)
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(f"config.init={config.init!r}: {e}") from None
    if arch.replace(name=model.name) != model:
      raise ConfigError(f"config.init={config.init!r} holds a {arch.name!r} architecture that "
                        f"differs from config.model={model.name!r}; use --config.model=auto.")
  spec = config.tokenizer
  try:
    if spec.startswith("train:"):
      vocab = spec.split(":", 1)[1]
      if not vocab.isdigit() or not 8 <= int(vocab) <= model.vocab_size:
        raise ValueError(f"the vocabulary size must be an integer in [8, {model.vocab_size}] "
                         f"(the model's vocab_size), e.g. train:512.")
    elif spec == "auto":
      weight_source.tokenizer_near(config.init)
    elif spec.startswith("run:"):
      tokenizer_lib.find_tokenizer(pathlib.Path(spec[4:]))
    elif not pathlib.Path(spec).exists():
      raise FileNotFoundError(f"{spec} does not exist; pass a SentencePiece .model, an HF "
                              f"tokenizer.json (or its directory), train:<vocab>, run:<dir> "
                              f"or auto.")
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config.tokenizer={spec!r}: {e}") from None
  d = config.data
  try:
    src = sources.make_source(d.source, d.train_split, tfds_data_dir=d.tfds_data_dir or None)
    if len(src) == 0:
      raise ValueError(f"split {d.train_split!r} has no documents.")
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config.data.source={d.source!r}: {e}") from None


def resolve_tokenizer(config, workdir: pathlib.Path, model) -> Any:
  """Loads (or, for "train:<vocab>", trains into the workdir) the run's tokenizer.

  config.tokenizer: "train:<vocab>" | "run:<workdir>" | "auto" (the tokenizer shipped next to
  config.init's checkpoint) | a path (SentencePiece .model, HF tokenizer.json, or a directory
  holding one). A tokenizer from outside the run is copied into it (tokenizer.model, or the HF
  files under tokenizer/), so exports and `sample` find it next to the checkpoint.
  """
  import jax
  from matquant_jax.checkpoints import weight_source
  from matquant_jax.data import sources
  from matquant_jax.data import tokenizer as tokenizer_lib
  from matquant_jax.models import config as model_config_lib
  spec = config.tokenizer
  family = "gemma" if model.norm_type == model_config_lib.NormType.ZERO_CENTERED else "mistral"
  target = workdir / "tokenizer.model"
  try:
    if spec.startswith("train:"):
      vocab = int(spec.split(":", 1)[1])
      if not target.exists():
        if jax.process_index() == 0:
          src = sources.make_source(config.data.source, config.data.train_split,
                                    tfds_data_dir=config.data.tfds_data_dir or None)
          texts = (src[i] for i in range(min(len(src), 20_000)))
          tokenizer_lib.train_tokenizer(texts, str(target.with_suffix("")), vocab, family=family)
      if jax.process_count() > 1:  # the others read what process 0 wrote
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("matquant_jax: tokenizer trained")
      tok = tokenizer_lib.Tokenizer.from_file(target, family=family)
    else:
      if spec == "auto":
        path = weight_source.tokenizer_near(config.init)
      elif spec.startswith("run:"):
        path = tokenizer_lib.find_tokenizer(pathlib.Path(spec[4:]))
      else:
        path = pathlib.Path(spec)
      tok = tokenizer_lib.open_tokenizer(path, family=family)
      if jax.process_index() == 0:
        tokenizer_lib.copy_tokenizer(tok, workdir)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config.tokenizer={spec!r}: {e}") from None
  if tok.vocab_size > model.vocab_size:
    raise ConfigError(f"tokenizer {spec!r} has {tok.vocab_size} pieces but model "
                      f"{model.name!r} has vocab_size {model.vocab_size}.")
  return tok
