"""Data: tokenizer (and, from other modules, the text pipelines)."""

from matquant_jax.data.tokenizer import FAMILIES
from matquant_jax.data.tokenizer import Tokenizer
from matquant_jax.data.tokenizer import family_spec
from matquant_jax.data.tokenizer import train_tokenizer
