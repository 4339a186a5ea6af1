"""OmniQuant calibration configs (ml_collections) and their validation into a `CalibSetup`.

Defaults are the paper's (spec §6, App. B) where it states them:
  * data: 128 sequences × 2048 tokens sampled from C4 (`tfds:c4/en`, train split), batch 4;
  * optimizer: constant learning rate 1e-3. The optimizer is not stated: AdamW with weight
    decay 0 (i.e. Adam), as in OmniQuant's code;
  * budget: 10M tokens, 20M for the int2 baseline ("following OmniQuant"), 8.3M for the
    co-distillation runs. The paper does not say whether this is per layer or in total; we
    read it per block, as OmniQuant counts epochs per block: every block is trained for
    ceil(budget / (batch × seq_len)) steps over the 262,144-token calibration set, i.e.
    1,221 steps ≈ 38.2 epochs for 10M (20M: 2,442 steps ≈ 76.3 epochs; 8.3M: 1,014 steps ≈
    31.7 epochs). `calibration.steps_per_block` overrides the derived count;
  * λ = (0.1, 0.1, 1.0) for Gemma-2 and (0.4, 0.4, 1.0) for Mistral (App. B, OmniQuant);
    (1, 1, 1) for Extra Precision; (1.0,) for Single Precision and baselines.
Choices the paper leaves open (spec §11), each a field with its default:
  * calibration.input_mode = "fp": layer l sees the full-precision model's activations X_l
    (Eq. 5 writes the same X_l on both sides, and §3 says each layer is optimized
    independently; it also keeps one activation stream whatever |R| is). "quantized" feeds
    each width r its own quantized model's activations, as OmniQuant's code does for one
    width (|R| extra host streams); "quantized_shared" feeds every width the narrowest
    width's quantized stream (one extra stream). The paper-experiment configs
    (`paper_omniquant_config`) use "quantized" and OmniQuant's learning rates.
  * calibration.let = "scale": scale-only LET folded into norms and weights; "scale_shift"
    adds Eq. 4's shift δ on the FFN input, folded into two new full-precision biases the
    exported model then carries (TransformerConfig.ffn_shift; transform.py explains both
    placements); "none" = LWC only.
  * calibration.lwc_init_logit = 4.0 (σ(4) ≈ 0.982, OmniQuant); LET scales start at 1.
  * calibration.lwc_max = 1.0: γ, β = lwc_max·σ(logit) < 1, OmniQuant's bound; above 1 the
    clipped range may also grow, which MatQuant's int2 slice (top level at 192/255 of the
    int8 range) uses (README: 0.035 nats at int2 for 0.017 at int8/int4 on the demo).
  * the co-distillation term is the L2 distance of block outputs to the teacher slice's block
    output with the teacher's gradient stopped, weighted equally with the ground-truth term
    and scaled by λ_r (spec §4 leaves the form open).
  * granularity per output channel (the contracting axes of quant/kernels.py), zero point not
    rounded (Eq. 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections
from ml_collections import config_dict

from matquant_jax.calibration import block as block_lib
from matquant_jax.calibration import transform
from matquant_jax.models import config as model_config_lib
from matquant_jax.training import objectives as objectives_lib
from matquant_jax.training import sharding as sharding_lib
from matquant_jax.training.config import PAPER_MODELS  # noqa: F401  (part of this API)
from matquant_jax.training.config import ConfigError  # one error type for QAT and calibration
from matquant_jax.training.config import parse_config_arg  # noqa: F401  (for configs/)
from matquant_jax.training.config import set_paper_model


# λ (λ8, λ4, λ2) of OmniQuant MatQuant per model family (App. B).
OMNIQUANT_LAMBDAS = {"gemma": (0.1, 0.1, 1.0), "mistral": (0.4, 0.4, 1.0)}

# Token budgets per block (spec §6).
BUDGET_TOKENS = 10_000_000
BUDGET_TOKENS_INT2_BASELINE = 20_000_000
BUDGET_TOKENS_CODISTILL = 8_300_000


HOST_DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
  """Every field of a calibration run, typed (typos and ill-typed overrides are errors).

  Long: one line per config field with its documented default: the reference a reader scans,
  kept in one place.
  """
  c = ml_collections.ConfigDict()
  c.model = "gemma2_2b"          # a preset of matquant_jax.models.config.PRESETS
  # Weights to calibrate: random | run:<workdir> | hf:<dir> | gemma:<dir> | mistral:<dir>
  # (as in QAT). They are loaded to host memory; only one block at a time goes to devices.
  c.init = "random"
  c.tokenizer = "train:512"      # a .model file, train:<vocab> or run:<workdir> (as in QAT)
  c.run_name = ""                  # prefixes console lines (runs sharing one console)
  c.seed = 0

  c.objective = ml_collections.ConfigDict()
  c.objective.method = "matquant"  # matquant | single_precision | extra_precision | baseline
  c.objective.bits = config_dict.placeholder(tuple)      # R, or (r,) for a baseline
  c.objective.weights = config_dict.placeholder(tuple)   # λ aligned with bits
  c.objective.codistill = ""       # e.g. "[8,4,2,8->4;2]" (spec §4)
  c.objective.scope = "ffn"        # ffn (paper) | ffn+attn | attn
  c.objective.extra_precision = config_dict.placeholder(bool)
  c.objective.family = "gemma"     # default λ: gemma (0.1, 0.1, 1) | mistral (0.4, 0.4, 1)

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds:c4/en"     # kjv | text:<path>[,<path>] | tfds:<name>
  c.data.tfds_data_dir = ""
  c.data.train_split = "train"
  c.data.num_samples = 128         # calibration sequences
  c.data.seq_len = 2048
  c.data.seed = 0
  c.data.add_bos = True
  c.data.add_eos = True

  c.calibration = ml_collections.ConfigDict()
  c.calibration.batch_size = 4
  # Tokens each block trains on; None = the paper's budget for the objective (see above).
  c.calibration.budget_tokens = config_dict.placeholder(int)
  c.calibration.steps_per_block = 0  # > 0 overrides the budget
  c.calibration.lr = 1e-3
  # Separate LWC / LET learning rates (None = lr). The paper states one constant 1e-3;
  # OmniQuant's code uses 1e-2 for LWC and 5e-3 for LET. With σ-parametrized clipping at
  # init logit 4, Adam moves a logit by about lr per step, so 1e-3 over 1,221 steps lets γ, β
  # fall at most to about σ(2.8) ≈ 0.94; set lwc_lr=1e-2 for OmniQuant's clipping range.
  c.calibration.lwc_lr = config_dict.placeholder(float)
  c.calibration.let_lr = config_dict.placeholder(float)
  c.calibration.b1 = 0.9
  c.calibration.b2 = 0.999
  c.calibration.eps = 1e-8
  c.calibration.weight_decay = 0.0
  c.calibration.lwc = True
  c.calibration.lwc_init_logit = 4.0
  # Upper bound of γ, β (γ = lwc_max·σ(logit)): 1 is OmniQuant's sigmoid, which can only shrink
  # a range; MatQuant's sliced int2 grid tops out at 192/255 of the int8 range and needs it to
  # grow (minmax.lwc_factor). Initial factors stay σ(lwc_init_logit) either way.
  c.calibration.lwc_max = 1.0
  c.calibration.let = "scale"      # scale | scale_shift | none (transform.py)
  c.calibration.round_zero = False
  c.calibration.input_mode = "fp"  # fp | quantized | quantized_shared (block.INPUT_MODES)
  # none (Eq. 5/7 as written) | minmax: each width's error divided by its MinMax error
  # (block.StepOptions explains why λ needs it in block-wise calibration).
  c.calibration.loss_normalization = "none"
  c.calibration.num_microbatches = 1
  c.calibration.compute_dtype = "bfloat16"  # block forward activations; LWC/LET state is f32
  c.calibration.host_dtype = "float32"      # calibration activations kept in host memory
  c.calibration.host_param_dtype = "float32"  # the model's weights in host memory

  c.mesh = ml_collections.ConfigDict()
  # Data-parallel devices for one block: 0 = the most local devices that divide the batch
  # (4 with the paper's batch of 4 on 8 devices), -1 = all (must divide the batch), n = n.
  c.mesh.data = 0

  c.log_every_steps = 100
  c.stop_after_blocks = 0          # > 0: stop after that many blocks (rerun to resume)
  c.export = True                  # write the int8 MatQuant checkpoint at the end
  c.aot_only = False               # compile a block step, report memory, do not run
  # With aot_only: compile the block step for this TPU topology (e.g. "v5e:2x2"; needs libtpu,
  # the [tpu] extra) and print one JSON report (training/aot.py) as the last line.
  c.aot_topology = ""
  return c


def paper_omniquant_config(model: str) -> ml_collections.ConfigDict:
  """Spec §6 OmniQuant calibration of one of the paper's models; the caller picks the method.

  OmniQuant's own procedure, which the paper builds on, where the paper is silent or terse:
    * calibration.input_mode = "quantized": each block reads the quantized model's output of
      the previous block, one stream per width of R, against full-precision targets (the
      paper's Eq. 5 reading, "fp", is one override away). Measured on the demo model
      (int2 log pplx, 150 steps/block): fp 3.252, quantized 3.251, quantized_shared 3.258;
      at 100 steps fp 3.290, quantized 3.275.
    * calibration.lwc_lr = 1e-2 and let_lr = 5e-3, OmniQuant's code; the paper's single
      1e-3 is --config.calibration.lwc_lr=1e-3 --config.calibration.let_lr=1e-3.
    * calibration.let = "scale_shift": Eq. 4's LET with its shift δ, folded into two biases
      the exported int8 checkpoint carries (HF export then refuses it; --config.calibration.
      let=scale keeps the released architecture).
    * calibration.loss_normalization = "none": Eq. 7 as written ("minmax" protects int8/int4
      at int2's expense; block.StepOptions).

  Set the released weights and tokenizer on the command line, e.g.
  --config.init=gemma:/ckpts/gemma2-9b --config.tokenizer=/ckpts/tokenizer.model.
  """
  c = set_paper_model(default_config(), model)
  c.calibration.input_mode = "quantized"
  c.calibration.lwc_lr = 1e-2
  c.calibration.let_lr = 5e-3
  c.calibration.let = "scale_shift"
  return c


@dataclasses.dataclass(frozen=True)
class CalibSetup:
  """A validated calibration run (everything the loop needs except weights and data)."""
  model: model_config_lib.TransformerConfig
  objective: objectives_lib.Objective
  step: block_lib.StepOptions
  mesh: jax.sharding.Mesh
  batch_size: int
  num_samples: int
  seq_len: int
  steps_per_block: int
  budget_tokens: int
  seed: int
  host_dtype: str
  log_every_steps: int

  @property
  def epochs_per_block(self) -> float:
    return self.steps_per_block * self.batch_size / self.num_samples

  def fingerprint(self) -> dict[str, Any]:
    """What determines the per-block results: a workdir only resumes the same run."""
    return {"model": self.model.to_dict(), "objective": self.objective.describe(),
            "parent_bits": self.objective.parent_bits, "step": repr(self.step),
            "batch_size": self.batch_size, "num_samples": self.num_samples,
            "seq_len": self.seq_len, "steps_per_block": self.steps_per_block,
            "seed": self.seed, "host_dtype": self.host_dtype}

  def describe(self) -> str:
    return (f"{self.model.name} | {self.objective.describe()} | LET {self.step.calib.let} | "
            f"LWC {'on' if self.step.calib.lwc else 'off'} | input {self.step.input_mode} | "
            f"{self.steps_per_block} steps/block of {self.batch_size}×{self.seq_len} "
            f"({self.steps_per_block * self.batch_size * self.seq_len:,} tokens, "
            f"{self.epochs_per_block:.1f} epochs over {self.num_samples} samples) | "
            f"mesh {dict(self.mesh.shape)}")


def paper_budget_tokens(objective: objectives_lib.Objective) -> int:
  """Spec §6: 10M tokens; 20M for the int2 baseline; 8.3M with co-distillation."""
  if objective.distill:
    return BUDGET_TOKENS_CODISTILL
  if objective.method == "baseline" and objective.bits == (2,):
    return BUDGET_TOKENS_INT2_BASELINE
  return BUDGET_TOKENS


def make_calib_objective(method: str = "matquant", *, bits=None, weights=None, codistill: str = "",
                         scope: str = "ffn", extra_precision=None, family: str = "gemma"
                         ) -> objectives_lib.Objective:
  """`objectives.make_objective` with OmniQuant's default λ (App. B) instead of QAT's."""
  if method == "bf16":
    raise ValueError("calibration quantizes: method 'bf16' has nothing to calibrate.")
  if weights is None and method == "matquant":
    if family not in OMNIQUANT_LAMBDAS:
      raise ValueError(f"no default λ for family {family!r}; use gemma or mistral, or pass "
                       f"weights explicitly.")
    if _resolved_bits(bits, codistill) == (8, 4, 2):
      weights = OMNIQUANT_LAMBDAS[family]
  return objectives_lib.make_objective(
      method, bits=bits, weights=weights, codistill=codistill, scope=scope,
      extra_precision=extra_precision, family=family)


def _resolved_bits(bits, codistill: str) -> tuple[int, ...]:
  if codistill:
    gt, pairs = objectives_lib.parse_codistill(codistill)
    return tuple(sorted(set(gt) | {s for _, s in pairs}, reverse=True))
  return tuple(sorted(bits, reverse=True)) if bits is not None else (8, 4, 2)


def _auto_data_parallel(batch_size: int, n_devices: int) -> int:
  return max(d for d in range(1, n_devices + 1) if batch_size % d == 0)


def resolve(config: ml_collections.ConfigDict, *, devices=None) -> CalibSetup:
  """Validates `config` into a CalibSetup; raises ConfigError naming the field and the fix."""
  from matquant_jax.checkpoints import weight_source  # pylint: disable=g-import-not-at-top
  try:
    model = weight_source.model_config(config.model, config.init)
  except ValueError as e:
    raise ConfigError(f"config.model={config.model!r}: {e}") from None
  o = config.objective
  try:
    objective = make_calib_objective(
        o.method, bits=o.bits, weights=o.weights, codistill=o.codistill, scope=o.scope,
        extra_precision=o.extra_precision,
        family=weight_source.lambda_family(model) if o.family == "auto" else o.family)
  except ValueError as e:
    raise ConfigError(f"config.objective: {e}") from None
  cal, d = config.calibration, config.data
  step = _step_options(cal, objective)
  _check_calibration(cal)
  b = _check_batches(cal, d)
  mesh = _mesh(config, b, devices)
  steps = _steps_per_block(cal, objective, b, int(d.seq_len))
  _check_run(config)
  return CalibSetup(model=model, objective=objective, step=step, mesh=mesh, batch_size=b,
                    num_samples=int(d.num_samples), seq_len=int(d.seq_len),
                    steps_per_block=steps, budget_tokens=int(steps * b * d.seq_len),
                    seed=int(config.seed), host_dtype=cal.host_dtype,
                    log_every_steps=int(config.log_every_steps))


def _step_options(cal, objective) -> block_lib.StepOptions:
  try:
    calib_opts = transform.CalibOptions(
        scope=objective.scope, lwc=bool(cal.lwc), lwc_init_logit=float(cal.lwc_init_logit),
        lwc_max=float(cal.lwc_max), let=cal.let, round_zero=bool(cal.round_zero))
    step = block_lib.StepOptions(
        calib=calib_opts, input_mode=cal.input_mode, compute_dtype=cal.compute_dtype,
        num_microbatches=int(cal.num_microbatches), lr=float(cal.lr), b1=float(cal.b1),
        b2=float(cal.b2), eps=float(cal.eps), weight_decay=float(cal.weight_decay),
        lwc_lr=None if cal.lwc_lr is None else float(cal.lwc_lr),
        let_lr=None if cal.let_lr is None else float(cal.let_lr),
        loss_normalization=cal.loss_normalization)
  except ValueError as e:
    raise ConfigError(f"config.calibration: {e}") from None
  return step


def _check_calibration(cal) -> None:
  """Every numeric field of config.calibration in range."""
  if not cal.lwc and cal.let == "none":
    raise ConfigError("config.calibration: lwc=False and let='none' leave nothing to learn; "
                      "that is plain MinMax (export it with export_matquant_checkpoint).")
  for f in ("lr", "lwc_lr", "let_lr"):
    if cal[f] is not None and not (math.isfinite(cal[f]) and cal[f] > 0):
      raise ConfigError(f"config.calibration.{f}={cal[f]} must be a positive number.")
  for f, ok, rule in (("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
                      ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
                      ("eps", lambda v: v > 0, "> 0"),
                      ("weight_decay", lambda v: v >= 0, ">= 0"),
                      ("lwc_init_logit", lambda v: True, "finite")):
    if not (math.isfinite(float(cal[f])) and ok(float(cal[f]))):
      raise ConfigError(f"config.calibration.{f}={cal[f]} must be {rule}.")
  if cal.steps_per_block < 0:
    raise ConfigError(f"config.calibration.steps_per_block={cal.steps_per_block} must be >= 0 "
                      f"(0 = derive it from the token budget).")
  if cal.num_microbatches <= 0:
    raise ConfigError(f"config.calibration.num_microbatches={cal.num_microbatches} must be "
                      f">= 1.")
  for f in ("host_dtype", "host_param_dtype"):
    if cal[f] not in HOST_DTYPES:
      raise ConfigError(f"config.calibration.{f}={cal[f]!r}; choose one of {HOST_DTYPES}.")


def _check_batches(cal, d) -> int:
  """config.data against the calibration batch; returns the batch size."""
  if d.seq_len <= 1:
    raise ConfigError(f"config.data.seq_len={d.seq_len} must be > 1.")
  if d.num_samples <= 0:
    raise ConfigError(f"config.data.num_samples={d.num_samples} must be positive.")
  b = int(cal.batch_size)
  if b <= 0 or b > d.num_samples:
    raise ConfigError(f"config.calibration.batch_size={b} must be in [1, data.num_samples="
                      f"{d.num_samples}].")
  if b % cal.num_microbatches:
    raise ConfigError(f"config.calibration.batch_size={b} is not divisible by "
                      f"num_microbatches={cal.num_microbatches}.")
  if d.num_samples % b:
    raise ConfigError(f"config.data.num_samples={d.num_samples} is not a multiple of "
                      f"calibration.batch_size={b}: every epoch must consist of whole batches "
                      f"(the evaluation passes and the sample order rely on it).")
  return b


def _mesh(config, b: int, devices):
  """The data-parallel mesh of this host's devices (config.mesh.data; 0 = auto)."""
  cal = config.calibration
  devices = list(devices if devices is not None else jax.local_devices())
  if jax.process_count() > 1:
    raise ConfigError("calibration runs in one process (one host); launch it on one host of "
                      "the slice (data-parallel over that host's devices).")
  n_data = int(config.mesh.data)
  if n_data == 0:
    n_data = _auto_data_parallel(b // int(cal.num_microbatches), len(devices))
  elif n_data == -1:
    n_data = len(devices)
  if n_data <= 0 or n_data > len(devices):
    raise ConfigError(f"config.mesh.data={config.mesh.data}: {len(devices)} devices are "
                      f"available (0 = auto, -1 = all).")
  micro = b // int(cal.num_microbatches)
  if micro % n_data:
    raise ConfigError(
        f"config.calibration.batch_size={b} (micro-batches of {micro}) is not divisible by the "
        f"{n_data} data-parallel devices (config.mesh.data={config.mesh.data}); use a "
        f"multiple of {n_data} or set mesh.data=0 (auto).")
  try:
    mesh = sharding_lib.make_mesh(n_data, 1, 1, devices=devices[:n_data])
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  return mesh


def _steps_per_block(cal, objective, b: int, seq_len: int) -> int:
  """config.calibration.steps_per_block, or derived from the token budget."""
  budget = cal.budget_tokens
  if budget is None:
    budget = paper_budget_tokens(objective)
  if cal.steps_per_block > 0:
    steps = int(cal.steps_per_block)
  else:
    if budget <= 0:
      raise ConfigError(f"config.calibration.budget_tokens={budget} must be positive (or set "
                        f"steps_per_block).")
    steps = math.ceil(budget / (b * seq_len))
  if steps <= 0:
    raise ConfigError(f"config.calibration.steps_per_block={cal.steps_per_block} must be "
                      f">= 0.")
  return steps


def _check_run(config) -> None:
  """Required paths set unless only compiling; logging and stopping fields in range."""
  if not config.aot_only:
    for f, example in (("init", "gemma:/ckpts/gemma2-9b"),
                       ("tokenizer", "/ckpts/tokenizer.model")):
      if config[f] == "required":
        raise ConfigError(f"config.{f} must be set for this experiment, e.g. "
                          f"--config.{f}={example} (only --config.aot_only=True runs without "
                          f"it).")
  if config.log_every_steps <= 0:
    raise ConfigError(f"config.log_every_steps={config.log_every_steps} must be positive.")
  if config.stop_after_blocks < 0:
    raise ConfigError(f"config.stop_after_blocks={config.stop_after_blocks} must be >= 0.")
