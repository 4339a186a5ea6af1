"""Serving: packed r-bit weights from one int8 MatQuant checkpoint, fast matmuls, sampling.

    from matquant_jax import serving
    model = serving.load_serving("ckpt/", "ffn:int2")     # streamed, packed at 2 bits/weight
    out = model.generate(prompts, max_new_tokens=32)
    model.weight_bytes(), serving.memory_report(model.params)

Modules: `layouts` (the packed layouts, documented there), `weights` (`PackedWeight`, the
pytree that sits in the params tree in place of a kernel), `matmul` (the packed matmul and the
guard that picks XLA or a Pallas kernel), `pallas_gpu` / `pallas_tpu` (the kernels), `loader`
(streaming load, serving checkpoints, memory reports).
"""

from matquant_jax.serving import layouts
from matquant_jax.serving.loader import ServingModel
from matquant_jax.serving.loader import export_serving_checkpoint
from matquant_jax.serving.loader import load_serving
from matquant_jax.serving.loader import load_serving_checkpoint
from matquant_jax.serving.loader import memory_report
from matquant_jax.serving.matmul import PATHS
from matquant_jax.serving.matmul import packed_einsum
from matquant_jax.serving.matmul import packed_matmul
from matquant_jax.serving.matmul import resolve_path
from matquant_jax.serving.matmul import select_path
from matquant_jax.serving.weights import PackedWeight
from matquant_jax.serving.weights import int4_packed_in_memory
from matquant_jax.serving.weights import pack_kernel
from matquant_jax.serving.weights import resident_nbytes
from matquant_jax.serving.weights import set_path

__all__ = [
    "PATHS", "PackedWeight", "ServingModel", "export_serving_checkpoint", "int4_packed_in_memory",
    "layouts", "load_serving", "load_serving_checkpoint", "memory_report", "pack_kernel",
    "packed_einsum", "packed_matmul", "resident_nbytes", "resolve_path", "select_path",
    "set_path",
]
