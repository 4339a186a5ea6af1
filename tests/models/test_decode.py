"""KV-cache decoding and the sampler agree with full forward passes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.models import Sampler
from matquant_jax.models import get_config
from matquant_jax.models import init_cache
from matquant_jax.models import sample_logits
from matquant_jax.quant.plan import PrecisionPlan

MAX_LEN = 32  # every full forward pass here is [2, MAX_LEN]: one compile per model and plan
PROMPT_LEN = 12  # > the window of 8: prefill must not lose keys the ring has overwritten
# Every sampler call here has this prompt shape and length: one compile per plan.
N_PROMPT, N_NEW = 7, 14  # 7 + 14 > the window of 8


def _padded(rows, length=MAX_LEN):
  """Right-pads variable-length rows: ([len(rows), length] tokens, segment ids)."""
  tokens = np.zeros((len(rows), length), np.int32)
  segment_ids = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    segment_ids[i, :len(row)] = 1
  return tokens, segment_ids


def _prompts(config, seed, lengths=(3, N_PROMPT)):
  tokens = np.random.RandomState(seed).randint(3, config.vocab_size, (2, N_PROMPT))
  return _padded([t[:n] for t, n in zip(tokens, lengths)], N_PROMPT)[0], np.asarray(lengths)


def _check_against_rerun(tiny_models, name, prompts, lengths, out, plan="bf16"):
  """Each generated token is the argmax of a full forward pass over prompt + generated."""
  n_new = out.tokens.shape[1]
  seqs = [np.concatenate([p[:n], np.asarray(t)]) for p, n, t in zip(prompts, lengths, out.tokens)]
  full = tiny_models.logits(name, *_padded(seqs), plan=plan)
  for row, n in enumerate(lengths):
    expected = full[row, n - 1:n - 1 + n_new]
    np.testing.assert_allclose(np.asarray(out.logits[row]), expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.argmax(expected, -1), out.tokens[row])


@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_mistral"])
def test_cache_ring_sizes(name):
  config = get_config(name)
  cache = init_cache(config, batch=3, max_len=MAX_LEN)
  for i in range(config.num_layers):
    size = 8 if config.is_local(i) else MAX_LEN
    c = cache[f"layer_{i}"]
    assert c["k"].shape == c["v"].shape == (3, size, config.num_kv_heads, config.head_dim)
    assert c["positions"].shape == c["segment_ids"].shape == (3, size)
  assert init_cache(config, 1, 4)["layer_0"]["k"].shape[1] == 4  # min(W, max_len)


@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_mistral"])
def test_cached_decoding_matches_full_forward(tiny_models, name):
  """Prefill a right-padded batch (rows of 12 and 5 tokens), then decode one token per step
  well past the window; every step's logits equal the full forward pass's."""
  config, params = get_config(name), tiny_models.params(name)
  lengths = np.array([PROMPT_LEN, 5])
  tokens = np.random.RandomState(0).randint(3, config.vocab_size, (2, MAX_LEN))
  full = tiny_models.logits(name, tokens)  # each row unpadded

  step = tiny_models.step_fn(name)
  prompt, segment_ids = _padded([t[:n] for t, n in zip(tokens, lengths)], PROMPT_LEN)
  positions = np.broadcast_to(np.arange(PROMPT_LEN), prompt.shape)
  cache = init_cache(config, 2, MAX_LEN)
  logits, cache = step({"params": params}, jnp.asarray(prompt), jnp.asarray(positions),
                       jnp.asarray(segment_ids), cache)
  logits = np.asarray(logits)
  for row, n in enumerate(lengths):
    np.testing.assert_allclose(logits[row, :n], full[row, :n], atol=1e-5, rtol=0)
  for s in range(MAX_LEN - PROMPT_LEN):
    pos = lengths + s
    tok = tokens[np.arange(2), pos][:, None]
    logits, cache = step({"params": params}, jnp.asarray(tok), jnp.asarray(pos[:, None]),
                         jnp.ones((2, 1), jnp.int32), cache)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[np.arange(2), pos], atol=1e-5,
                               rtol=0, err_msg=f"step {s}")


def test_greedy_sampler_matches_full_forward_rerun(tiny_models):
  name = "tiny_gemma2"
  config = get_config(name)
  prompts, lengths = _prompts(config, seed=2)
  out = Sampler(config)(tiny_models.params(name), prompts, max_new_tokens=N_NEW, eos_ids=(),
                        return_logits=True)
  assert out.tokens.shape == (2, N_NEW) and out.logits.shape == (2, N_NEW, config.vocab_size)
  np.testing.assert_array_equal(out.lengths, [N_NEW, N_NEW])
  _check_against_rerun(tiny_models, name, prompts, lengths, out)


def test_sampler_stops_at_eos_and_pads(tiny_models):
  name = "tiny_gemma2"
  config, params = get_config(name), tiny_models.params(name)
  prompts, _ = _prompts(config, seed=3)
  sampler = Sampler(config)
  kwargs = dict(max_new_tokens=N_NEW, return_logits=True)
  free = sampler(params, prompts, eos_ids=(), **kwargs)
  eos = int(free.tokens[0, N_NEW // 2])  # row 0 stops at this token's first occurrence
  out = sampler(params, prompts, eos_ids=eos, **kwargs)
  for row in range(2):
    free_row, row_out = np.asarray(free.tokens[row]), np.asarray(out.tokens[row])
    hits = np.flatnonzero(free_row == eos)
    n = hits[0] + 1 if hits.size else N_NEW
    assert out.lengths[row] == n
    np.testing.assert_array_equal(row_out[:n], free_row[:n])
    assert (row_out[n:] == config.pad_id).all()
  assert out.lengths[0] <= N_NEW // 2 + 1


def test_sampler_with_quantized_plan(tiny_models):
  name, plan = "tiny_gemma2", "ffn+attn:int2"
  config, params = get_config(name), tiny_models.params(name)
  prompts, lengths = _prompts(config, seed=4)
  out = Sampler(config, PrecisionPlan.parse(plan))(
      params, prompts, max_new_tokens=N_NEW, eos_ids=(), return_logits=True)
  _check_against_rerun(tiny_models, name, prompts, lengths, out, plan)
  bf16 = Sampler(config)(params, prompts, max_new_tokens=N_NEW, eos_ids=(), return_logits=True)
  assert np.abs(np.asarray(bf16.logits[:, 0]) - np.asarray(out.logits[:, 0])).max() > 1e-3


def test_stochastic_sampling_settings(tiny_models):
  name = "tiny_gemma2"
  config, params = get_config(name), tiny_models.params(name)
  prompts, _ = _prompts(config, seed=5)
  sampler = Sampler(config)
  kwargs = dict(max_new_tokens=N_NEW, eos_ids=(), return_logits=True)
  greedy = sampler(params, prompts, **kwargs)
  # top_k=1 and a tiny nucleus both reduce sampling to argmax.
  for restrict in ({"top_k": 1}, {"top_p": 1e-6}):
    out = sampler(params, prompts, temperature=1.0, rng=jax.random.key(0), **restrict, **kwargs)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
  a = sampler(params, prompts, temperature=1.0, rng=jax.random.key(0), **kwargs)
  b = sampler(params, prompts, temperature=1.0, rng=jax.random.key(0), **kwargs)
  c = sampler(params, prompts, temperature=1.0, rng=jax.random.key(1), **kwargs)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
  assert (np.asarray(a.tokens) != np.asarray(greedy.tokens)).any()
  with pytest.raises(ValueError, match="rng"):
    sampler(params, prompts, max_new_tokens=5, temperature=1.0)
  # Settings are traced, and samplers over the same model share their programs.
  from matquant_jax.models import sampler as sampler_lib
  cache_size = getattr(sampler_lib._generate, "_cache_size", lambda: 0)  # private jax API
  before = cache_size()
  Sampler(config)(params, prompts, temperature=0.5, top_k=3, top_p=0.5, rng=jax.random.key(2),
                  **kwargs)
  assert cache_size() == before


def test_sample_logits_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  key = jax.random.key(0)
  topk = np.asarray(sample_logits(logits, key, temperature=1.0, top_k=2))
  assert set(np.unique(topk)) == {0, 1}
  topp = np.asarray(sample_logits(logits, key, temperature=1.0, top_p=0.9))
  assert set(np.unique(topp)) == {0, 1, 2}  # 0.5 + 0.3 < 0.9 needs the third token
  full = np.asarray(sample_logits(logits, key, temperature=1.0))
  assert set(np.unique(full)) == {0, 1, 2, 3}
  assert abs((full == 0).mean() - 0.5) < 0.05
  np.testing.assert_array_equal(sample_logits(logits, None), np.zeros(2000))
