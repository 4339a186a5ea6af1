"""Checkpoint readers and writers (HF safetensors, Mistral consolidated, Gemma Flax/Orbax), the
MatQuant int8 checkpoint, and `weight_source`: the one grammar for where weights come from
(`random | run:DIR | hf:DIR | gemma:DIR | mistral:DIR`) that every command line uses."""

from matquant_jax.checkpoints._common import CheckpointMismatchError
from matquant_jax.checkpoints.gemma_orbax import gemma_config_from_checkpoint
from matquant_jax.checkpoints.gemma_orbax import load_gemma_flax_checkpoint
from matquant_jax.checkpoints.gemma_orbax import save_gemma_flax_checkpoint
from matquant_jax.checkpoints.mistral_consolidated import load_mistral_consolidated
from matquant_jax.checkpoints.mistral_consolidated import save_mistral_consolidated
from matquant_jax.checkpoints.safetensors_io import load_hf_checkpoint
from matquant_jax.checkpoints.safetensors_io import save_hf_checkpoint
from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
from matquant_jax.checkpoints.matquant_checkpoint import export_matquant_checkpoint
from matquant_jax.checkpoints import weight_source

__all__ = [
    "CheckpointMismatchError", "MatQuantCheckpoint", "export_matquant_checkpoint",
    "gemma_config_from_checkpoint", "load_gemma_flax_checkpoint", "load_hf_checkpoint",
    "load_mistral_consolidated", "save_gemma_flax_checkpoint", "save_hf_checkpoint",
    "save_mistral_consolidated", "weight_source",
]
