"""matquant_jax: Matryoshka Quantization (Nair et al., ICML 2025) in JAX/Flax.

Train one int8 model whose most-significant-bit slices are good int4 and int2 models, store it
once, and slice it to any bit-width or per-layer Mix'n'Match plan with no retraining.
"""

from matquant_jax.checkpoints import MatQuantCheckpoint
from matquant_jax.checkpoints import export_matquant_checkpoint
from matquant_jax.models import Sampler
from matquant_jax.models import Transformer
from matquant_jax.models import TransformerConfig
from matquant_jax.models import get_config
from matquant_jax.quant import PrecisionPlan
from matquant_jax.quant import QTensor
from matquant_jax.quant.fake_quant import fake_quant
from matquant_jax.quant import slice_codes

__version__ = "0.1.0"

__all__ = [
    "MatQuantCheckpoint", "PrecisionPlan", "QTensor", "Sampler", "Transformer",
    "TransformerConfig", "__version__", "export_matquant_checkpoint", "fake_quant", "get_config",
    "slice_codes",
]
