"""matquant_jax: Matryoshka Quantization (Nair et al., ICML 2025) in JAX/Flax."""

from setuptools import find_packages, setup

# Exact pins: these are the versions the project is tested with (CPU CI and the
# jax 0.11.x CUDA image both run the same code).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",  # optax depends on it; the tests compare trees with it
    "ml-collections==1.1.0",
    "absl-py",
    "sentencepiece==0.2.3",
    # Hugging Face tokenizer.json files (BPE etc.) and their Jinja chat templates.
    "tokenizers==0.23.3",
    "jinja2==3.1.6",
    "tensorflow-datasets==4.9.10",
    # TFDS 4.9.10 needs it to build datasets but does not declare it.
    "importlib_resources",
    "grain==0.2.18",
    "numpy",
    "safetensors",
    "matplotlib",
]

EXTRAS_REQUIRE = {
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "hypothesis==6.170.17",
             # Its protobuf classes decode our TensorBoard event files in a test.
             "tensorboardX==2.6.5"],
    # Always this torch pin: a bare `torch` pulls a multi-GB CUDA build.
    "parity": ["torch==2.13.0", "transformers==5.23.0"],
    # libtpu for the project's jax: run on TPU VMs, and compile for any TPU topology from a
    # CPU host (--config.aot_topology=v5e:8x8). Harmless on CPU-only machines.
    "tpu": ["jax[tpu]==0.10.2"],
}

setup(
    name="matquant_jax",
    version="0.1.0",
    description="Matryoshka Quantization (MatQuant) for JAX/Flax: one int8 model, nested int4/int2.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["matquant_jax", "matquant_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
