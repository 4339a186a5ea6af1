"""Pure-JAX MatQuant numerics: MinMax quantizer, slicing S(q, r), STE fake-quant, QTensor,
precision plans and code statistics. No Flax modules here.

`quant.fake_quant` is the submodule (the STE op is `quant.fake_quant.fake_quant`, also exported
as `matquant_jax.fake_quant`): re-exporting the function here would shadow the module.
"""

from matquant_jax.quant import fake_quant
from matquant_jax.quant.minmax import dequantize
from matquant_jax.quant.minmax import lwc_factor
from matquant_jax.quant.minmax import minmax_params
from matquant_jax.quant.minmax import quantize
from matquant_jax.quant.minmax import round_half_up
from matquant_jax.quant.plan import PrecisionPlan
from matquant_jax.quant.plan import Scope
from matquant_jax.quant.plan import Strategy
from matquant_jax.quant.qtensor import QTensor
from matquant_jax.quant.slicing import extra_bucket_fraction
from matquant_jax.quant.slicing import extra_precision_effective_bits
from matquant_jax.quant.slicing import slice_codes
from matquant_jax.quant.slicing import slice_index
from matquant_jax.quant.stats import code_histogram
from matquant_jax.quant.stats import histogram_summary
from matquant_jax.quant.stats import tree_code_histograms

__all__ = [
    "PrecisionPlan", "QTensor", "Scope", "Strategy", "code_histogram", "dequantize",
    "extra_bucket_fraction", "extra_precision_effective_bits", "fake_quant", "histogram_summary",
    "lwc_factor", "minmax_params", "quantize", "round_half_up", "slice_codes", "slice_index",
    "tree_code_histograms",
]
