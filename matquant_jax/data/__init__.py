"""Data: the sentencepiece tokenizer, document sources (bundled KJV, local text, TFDS without
TensorFlow) and the packed, sharded, checkpointable LM pipeline."""

from matquant_jax.data.lm import DataConfig
from matquant_jax.data.lm import lm_dataset
from matquant_jax.data.lm import make_lm_dataset
from matquant_jax.data.sources import kjv_documents
from matquant_jax.data.sources import make_source
from matquant_jax.data.sources import text_file_documents
from matquant_jax.data.sources import tfds_text_source
from matquant_jax.data.tokenizer import FAMILIES
from matquant_jax.data.tokenizer import Tokenizer
from matquant_jax.data.tokenizer import family_spec
from matquant_jax.data.tokenizer import train_tokenizer

__all__ = [
    "DataConfig", "FAMILIES", "Tokenizer", "family_spec", "kjv_documents", "lm_dataset",
    "make_lm_dataset", "make_source", "text_file_documents", "tfds_text_source",
    "train_tokenizer",
]
