"""Flax linen models: Gemma-2 and Mistral/Llama in one configurable decoder.

`Transformer` runs at any `PrecisionPlan`; `init_cache` / `Sampler` decode with a KV cache;
`hf_mapping` converts parameters and configs to and from Hugging Face transformers.
"""

from matquant_jax.models.config import Activation
from matquant_jax.models.config import AttentionPattern
from matquant_jax.models.config import NormType
from matquant_jax.models.config import PRESETS
from matquant_jax.models.config import TransformerConfig
from matquant_jax.models.config import get_config
from matquant_jax.models.hf_mapping import config_from_hf_config
from matquant_jax.models.hf_mapping import hf_config_from_config
from matquant_jax.models.hf_mapping import hf_state_dict_from_params
from matquant_jax.models.hf_mapping import params_from_hf_state_dict
from matquant_jax.models.sampler import SampleOutput
from matquant_jax.models.sampler import Sampler
from matquant_jax.models.sampler import sample_logits
from matquant_jax.models.transformer import Transformer
from matquant_jax.models.transformer import init_cache
from matquant_jax.models.transformer import init_params
from matquant_jax.models.transformer import logical_axes
from matquant_jax.models.transformer import param_count
from matquant_jax.models.transformer import param_shapes

__all__ = [
    "Activation", "AttentionPattern", "NormType", "PRESETS", "TransformerConfig", "get_config",
    "config_from_hf_config", "hf_config_from_config", "hf_state_dict_from_params",
    "params_from_hf_state_dict", "SampleOutput", "Sampler", "sample_logits", "Transformer",
    "init_cache", "init_params", "logical_axes", "param_count", "param_shapes",
]
