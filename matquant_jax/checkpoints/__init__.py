"""Checkpoint readers and writers (HF safetensors, Mistral consolidated, Gemma Flax/Orbax)."""

from matquant_jax.checkpoints._common import CheckpointMismatchError
from matquant_jax.checkpoints.gemma_orbax import gemma_config_from_checkpoint
from matquant_jax.checkpoints.gemma_orbax import load_gemma_flax_checkpoint
from matquant_jax.checkpoints.gemma_orbax import save_gemma_flax_checkpoint
from matquant_jax.checkpoints.mistral_consolidated import load_mistral_consolidated
from matquant_jax.checkpoints.mistral_consolidated import save_mistral_consolidated
from matquant_jax.checkpoints.safetensors_io import load_hf_checkpoint
from matquant_jax.checkpoints.safetensors_io import save_hf_checkpoint
