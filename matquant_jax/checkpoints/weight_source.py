"""Where a run's starting weights come from: one grammar, one parser, for every command.

    random                 fresh random init of the configured model
    run:<workdir>          a finished training run's final_params (its config.json names the model)
    hf:<dir>               a Hugging Face directory (config.json + safetensors)
    gemma:<dir>[:<preset>] an official Gemma Flax/Orbax checkpoint (preset detected from shapes
                           when omitted)
    mistral:<dir>          a Mistral consolidated release (params.json + consolidated.safetensors)

`architecture(spec)` reads only configs and tensor headers (no weight data), so a CLI can build
the model config from the checkpoint itself (`--config.model=auto`) and validate everything
before anything heavy happens. `tokenizer_near(spec)` finds the tokenizer shipped with the
checkpoint (`--config.tokenizer=auto`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from matquant_jax.models import config as config_lib
from matquant_jax.models.config import TransformerConfig

PathLike = str | os.PathLike

KINDS = ("random", "run", "hf", "gemma", "mistral")
GRAMMAR = "random, run:<dir>, hf:<dir>, gemma:<dir>[:<preset>] or mistral:<dir>"


@dataclasses.dataclass(frozen=True)
class WeightSource:
  """A parsed weight-source spec."""
  kind: str                  # one of KINDS
  path: pathlib.Path | None  # None for random
  preset: str | None = None  # gemma only: the preset named after the directory

  def __str__(self) -> str:
    if self.kind == "random":
      return "random"
    tail = f":{self.preset}" if self.preset else ""
    return f"{self.kind}:{self.path}{tail}"


def parse(spec: str) -> WeightSource:
  """Parses `spec`; raises ValueError naming the grammar, or FileNotFoundError for a path
  that does not exist."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"weight source {spec!r}: use {GRAMMAR}.")
  if spec == "random":
    return WeightSource("random", None)
  kind, sep, rest = spec.partition(":")
  if not sep or kind not in KINDS or kind == "random" or not rest:
    raise ValueError(f"weight source {spec!r}: use {GRAMMAR}.")
  preset = None
  if kind == "gemma" and not pathlib.Path(rest).exists():
    head, _, tail = rest.rpartition(":")
    if head and tail in config_lib.PRESETS:
      rest, preset = head, tail
  path = pathlib.Path(rest).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"weight source {spec!r}: {path} does not exist.")
  if not path.is_dir():
    raise ValueError(f"weight source {spec!r}: {path} is a file; give the checkpoint's "
                     f"directory.")
  return WeightSource(kind, path, preset)


def architecture(spec: str | WeightSource) -> TransformerConfig:
  """The model config the checkpoint describes, read without loading any weight data.

  hf: every field from config.json (a preset when one matches exactly, else the checkpoint's
  own config); mistral: params.json; gemma: the preset named or detected from tensor shapes;
  run: the model named in the run's config.json. Unsupported features are refused by name.
  """
  src = spec if isinstance(spec, WeightSource) else parse(spec)
  if src.kind == "random":
    raise ValueError("weight source 'random' has no architecture of its own; name a model "
                     "(--config.model=<preset>).")
  if src.kind == "hf":
    from matquant_jax.checkpoints import safetensors_io  # pylint: disable=g-import-not-at-top
    from matquant_jax.models import hf_mapping  # pylint: disable=g-import-not-at-top
    d = safetensors_io.read_hf_config(src.path)
    try:
      config = hf_mapping.config_from_hf_config(d)
    except (KeyError, TypeError, ValueError) as e:
      from matquant_jax.checkpoints._common import CheckpointError  # pylint: disable=g-import-not-at-top
      raise CheckpointError(f"{src.path / safetensors_io.CONFIG_FILE}: {e}") from None
    return safetensors_io._matching_preset(config)  # pylint: disable=protected-access
  if src.kind == "mistral":
    from matquant_jax.checkpoints import mistral_consolidated as mc  # pylint: disable=g-import-not-at-top
    from matquant_jax.checkpoints import safetensors_io  # pylint: disable=g-import-not-at-top
    params_file = src.path / mc.PARAMS_FILE
    if not params_file.is_file():
      raise FileNotFoundError(f"{src.path} has no {mc.PARAMS_FILE}; the consolidated format "
                              "needs it.")
    infos = safetensors_io.list_tensors(mc._weight_files(src.path))  # pylint: disable=protected-access
    return mc.config_from_params_json(json.loads(params_file.read_text()),
                                      {n: i.shape for n, i in infos.items()})
  if src.kind == "gemma":
    if src.preset:
      return config_lib.get_config(src.preset)
    from matquant_jax.checkpoints import gemma_orbax  # pylint: disable=g-import-not-at-top
    return gemma_orbax.gemma_config_from_checkpoint(src.path)
  # run:
  if (src.path / "model_config.json").is_file():
    return TransformerConfig.from_dict(json.loads((src.path / "model_config.json").read_text()))
  cfg_file = src.path / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{src.path} is not a training run directory (no config.json).")
  run_cfg = json.loads(cfg_file.read_text())
  model = run_cfg.get("model_config") or run_cfg.get("model")
  if isinstance(model, dict):
    return TransformerConfig.from_dict(model)
  return config_lib.get_config(model)


AUTO = ("auto", "from_init")


def model_config(model: str, init: str) -> TransformerConfig:
  """An experiment's model: the preset `model` names, or for 'auto' / 'from_init' the
  architecture of the checkpoint `init` names. Raises ValueError naming the fix."""
  if model in AUTO:
    if init in ("random", "required", "", None):
      raise ValueError(f"model={model!r} takes the architecture from init, but "
                       f"init={init!r}; pass init=hf:<dir> (or gemma:/mistral:/run:).")
    try:
      return architecture(init)
    except FileNotFoundError as e:
      raise ValueError(str(e)) from None
  try:
    return config_lib.get_config(model)
  except ValueError as e:
    raise ValueError(f"{e}; or 'auto' to take init's architecture") from None


def lambda_family(config: TransformerConfig) -> str:
  """The paper's λ family of an architecture: 'gemma' (zero-centred norms) or 'mistral'."""
  return "gemma" if config.norm_type == config_lib.NormType.ZERO_CENTERED else "mistral"


def load(spec: str | WeightSource, model: TransformerConfig | None = None, *,
         dtype=None, shardings=None):
  """(config, params) from a checkpoint source (not 'random').

  Args:
    spec: the source.
    model: when given, the loaded architecture must equal it (names aside).
    dtype: numpy dtype of the arrays (default float32).
    shardings: None for numpy params on the host; else a tree of jax Shardings like the
      params: they come back as global jax arrays placed so, and a `run:` source is restored
      shard by shard (each process reads only what its devices hold).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from matquant_jax import checkpoints  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  src = spec if isinstance(spec, WeightSource) else parse(spec)
  dtype = np.float32 if dtype is None else dtype
  if src.kind == "run":
    config = architecture(src)
    _check_same(src, config, model)  # before any weight is read
    restored = _restore_run(src.path, config, shardings)
    if shardings is not None:
      return config, restored
    return config, jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), restored)
  if src.kind == "hf":
    config, params = checkpoints.load_hf_checkpoint(src.path, dtype=dtype)
  elif src.kind == "mistral":
    config, params = checkpoints.load_mistral_consolidated(src.path, dtype=dtype)
  elif src.kind == "gemma":
    config = model or architecture(src)
    params = checkpoints.load_gemma_flax_checkpoint(src.path, config, dtype=dtype)
  else:
    raise ValueError("weight source 'random' holds no weights to load.")
  _check_same(src, config, model)
  if shardings is not None:
    params = jax.tree_util.tree_map(lambda x, sh: jax.device_put(np.asarray(x, dtype), sh),
                                    params, shardings)
  return config, params


def _check_same(src: WeightSource, config: TransformerConfig,
                model: TransformerConfig | None) -> None:
  if model is not None and config.replace(name=model.name) != model:
    raise ValueError(f"weight source {src} holds a {config.name!r} architecture that differs "
                     f"from the model {model.name!r}; use --config.model=auto to take the "
                     f"checkpoint's own architecture.")


def _restore_run(workdir: pathlib.Path, config: TransformerConfig, shardings):
  """A finished run's final_params (float32), on the host CPU or placed by `shardings`."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from matquant_jax.models import transformer  # pylint: disable=g-import-not-at-top
  final = workdir / "final_params"
  if not final.exists():
    raise FileNotFoundError(f"{final} does not exist; run that job to the end first (it "
                            f"writes final_params when it finishes).")
  if shardings is None:
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    shardings = jax.tree_util.tree_map(lambda _: cpu, transformer.param_shapes(config))
  target = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      transformer.param_shapes(config), shardings)
  return ocp.StandardCheckpointer().restore(final.absolute(), target)


def tokenizer_near(spec: str | WeightSource) -> pathlib.Path:
  """The tokenizer shipped with a checkpoint: tokenizer.model, else tokenizer.json, in the
  checkpoint directory (or its parent)."""
  from matquant_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  src = spec if isinstance(spec, WeightSource) else parse(spec)
  if src.kind == "random":
    raise ValueError("tokenizer 'auto' needs a checkpoint to look next to, but init is "
                     "'random'; pass the tokenizer's path.")
  return tokenizer_lib.find_tokenizer(src.path)
