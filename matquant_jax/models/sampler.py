"""Autoregressive sampling with a KV cache, at any precision plan.

One jitted program per (prompt shape, max_new_tokens): the right-padded prompts are prefilled in
one model call, then a `jax.lax.while_loop` feeds one token per step until every row has
produced an end token or `max_new_tokens` tokens. Temperature, top-k, top-p and the end tokens
are traced arguments, so changing them does not recompile.

    sampler = Sampler(config, plan=PrecisionPlan.parse("ffn:int4"))
    out = sampler(params, prompts, max_new_tokens=32)                   # greedy
    out = sampler(params, prompts, max_new_tokens=32, temperature=0.8, top_p=0.95,
                  rng=jax.random.key(0))
    out.tokens   # [batch, max_new_tokens], pad_id after the end token
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from matquant_jax.models import transformer
from matquant_jax.models.config import TransformerConfig
from matquant_jax.quant.plan import PrecisionPlan

Dtype = Any


class SampleOutput(NamedTuple):
  """What `Sampler.__call__` returns.

  Attributes:
    tokens: [batch, max_new_tokens] int32 generated ids; the end token is included, and every
      slot after it (or after max_new_tokens) holds pad_id.
    lengths: [batch] int32 number of generated tokens (end token included).
    logits: [batch, max_new_tokens, vocab_size] float32, the logits each token was drawn from
      (before temperature/top-k/top-p), or None unless asked for.
  """
  tokens: jax.Array
  lengths: jax.Array
  logits: jax.Array | None = None


def sample_logits(logits: jax.Array, rng: jax.Array | None, temperature: float | jax.Array = 0.0,
                  top_k: int | jax.Array | None = None,
                  top_p: float | jax.Array | None = None) -> jax.Array:
  """Draws one token per row.

  The settings may be traced values (one compiled sampler serves them all); greedy decoding is
  then chosen at run time by temperature == 0.

  Args:
    logits: [batch, vocab].
    rng: a PRNG key (unused when greedy; None only for a Python temperature of 0).
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep only the k most likely tokens (ties with the k-th kept too); None or 0: all.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p;
      None or 1: all.

  Returns:
    [batch] int32 token ids.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if isinstance(temperature, (int, float)) and temperature == 0:
    return greedy
  vocab = logits.shape[-1]
  top_k = jnp.int32(0 if top_k is None else top_k)
  top_p = jnp.float32(1.0 if top_p is None else top_p)

  def restrict(scaled):
    desc = jnp.sort(scaled, axis=-1)[:, ::-1]
    k = jnp.clip(jnp.where(top_k > 0, top_k, vocab), 1, vocab)
    kth = jnp.take(desc, k - 1, axis=-1)[:, None]
    probs = jax.nn.softmax(desc, axis=-1)
    # A token is kept while the mass strictly before it is below top_p (the first always is).
    kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    nucleus = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled < jnp.maximum(kth, nucleus), -jnp.inf, scaled)

  def sample(logits):
    scaled = logits.astype(jnp.float32) / temperature
    # The full-vocabulary sort runs only when a top-k / top-p filter is asked for.
    scaled = jax.lax.cond((top_k > 0) | (top_p < 1.0), restrict, lambda x: x, scaled)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, sample, lambda _: greedy, logits)


# The model is a static argument (linen modules hash by their fields): every Sampler over the
# same config, plan and dtype shares one compiled program per shape.
@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "return_logits",
                                             "cache_dtype"))
def _generate(model: transformer.Transformer, params, prompts, lengths, rng, temperature, top_k,
              top_p, eos_ids, *, max_new_tokens: int, return_logits: bool, cache_dtype: Dtype):
  cfg = model.config
  batch, prompt_len = prompts.shape
  variables = {"params": params}
  cache = transformer.init_cache(cfg, batch, prompt_len + max_new_tokens, cache_dtype)
  idx = jnp.arange(prompt_len, dtype=jnp.int32)
  segment_ids = (idx[None, :] < lengths[:, None]).astype(jnp.int32)
  positions = jnp.broadcast_to(idx, prompts.shape)
  logits, cache = model.apply(variables, prompts, positions, segment_ids, cache)
  last = logits[jnp.arange(batch), lengths - 1].astype(jnp.float32)  # [B, V]

  tokens = jnp.full((batch, max_new_tokens), cfg.pad_id, jnp.int32)
  all_logits = (jnp.zeros((batch, max_new_tokens, cfg.vocab_size), jnp.float32)
                if return_logits else None)
  done = jnp.zeros((batch,), bool)
  generated = jnp.zeros((batch,), jnp.int32)
  ones = jnp.ones((batch, 1), jnp.int32)

  def cond(state):
    step, _, _, _, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, last, cache, tokens, all_logits, done, generated, rng = state
    rng, key = jax.random.split(rng)
    tok = sample_logits(last, key, temperature, top_k, top_p)
    tok = jnp.where(done, cfg.pad_id, tok)
    tokens = tokens.at[:, step].set(tok)
    if all_logits is not None:
      all_logits = all_logits.at[:, step].set(last)
    generated = generated + (~done).astype(jnp.int32)
    done = done | jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
    # Finished rows keep decoding (their outputs are discarded): a batch moves in lock step.
    positions = (lengths + step)[:, None]
    logits, cache = model.apply(variables, tok[:, None], positions, ones, cache)
    return (step + 1, logits[:, 0].astype(jnp.float32), cache, tokens, all_logits, done,
            generated, rng)

  state = (jnp.int32(0), last, cache, tokens, all_logits, done, generated, rng)
  _, _, _, tokens, all_logits, _, generated, _ = jax.lax.while_loop(cond, body, state)
  return SampleOutput(tokens=tokens, lengths=generated, logits=all_logits)


class Sampler:
  """Samples continuations of a batch of right-padded prompts.

  Attributes:
    config: the architecture.
    plan: the precision plan the model is served at.
    dtype: compute dtype.
    cache_dtype: KV cache dtype (default: the compute dtype).
  """

  def __init__(self, config: TransformerConfig, plan: PrecisionPlan = PrecisionPlan.bf16(), *,
               dtype: Dtype = jnp.float32, cache_dtype: Dtype | None = None):
    self.config = config
    self.plan = plan
    self.dtype = dtype
    self.cache_dtype = cache_dtype or dtype
    self.model = transformer.Transformer(config, plan=plan, dtype=dtype)

  def __call__(self, params, prompts: jax.Array, prompt_lengths: jax.Array | None = None, *,
               max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, rng: jax.Array | None = None,
               eos_ids: int | Sequence[int] | None = None,
               return_logits: bool = False) -> SampleOutput:
    """Generates up to `max_new_tokens` tokens per prompt.

    Args:
      params: the model parameters (tree of config.py, no 'params' level).
      prompts: [batch, prompt_len] int token ids, right-padded.
      prompt_lengths: [batch] real lengths (>= 1); default: up to the last non-pad token.
      max_new_tokens: the most tokens generated per row.
      temperature: 0 is greedy decoding.
      top_k, top_p: restrict sampling to the k most likely tokens / the top-p nucleus.
      rng: PRNG key, required when temperature > 0.
      eos_ids: tokens that end a row (default config.eos_id); () never stops early.
      return_logits: also return the logits each token was drawn from.

    Returns:
      SampleOutput.
    """
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if top_k is not None and top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {top_k}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if temperature > 0 and rng is None:
      raise ValueError("sampling with temperature > 0 needs an rng key.")
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2:
      raise ValueError(f"prompts must be [batch, prompt_len], got shape {prompts.shape}.")
    if prompt_lengths is None:
      idx = jnp.arange(1, prompts.shape[1] + 1, dtype=jnp.int32)
      prompt_lengths = jnp.max(jnp.where(prompts != self.config.pad_id, idx, 0), axis=1)
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    if bool(jnp.any(prompt_lengths < 1)):
      raise ValueError(f"every prompt needs at least one token; lengths {prompt_lengths}.")
    if eos_ids is None:
      eos_ids = (self.config.eos_id,)
    elif isinstance(eos_ids, int):
      eos_ids = (eos_ids,)
    # -1 matches no token: "never stop" keeps the same compiled program as one end token.
    eos_ids = jnp.asarray(tuple(int(e) for e in eos_ids) or (-1,), jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    # Sampling settings are traced: changing them does not recompile.
    return _generate(
        self.model, params, prompts, prompt_lengths, rng, jnp.float32(temperature),
        jnp.int32(top_k or 0), jnp.float32(1.0 if top_p is None else top_p), eos_ids,
        max_new_tokens=int(max_new_tokens), return_logits=bool(return_logits),
        cache_dtype=self.cache_dtype)
