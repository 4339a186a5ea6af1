"""HF checkpoint directories: safetensors IO, round trips, strict validation."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors

from matquant_jax.checkpoints import CheckpointMismatchError
from matquant_jax.checkpoints import _common
from matquant_jax.checkpoints import safetensors_io
from matquant_jax.checkpoints.safetensors_io import load_hf_checkpoint
from matquant_jax.checkpoints.safetensors_io import save_hf_checkpoint
from matquant_jax.models.config import get_config

BF16 = np.dtype(ml_dtypes.bfloat16)


def test_write_safetensors_is_readable_by_safetensors(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
             "b.c": rng.standard_normal((7,)).astype(BF16),
             "scalar": np.float32(2.5)}
  file = tmp_path / "x.safetensors"
  safetensors_io.write_safetensors(file, tensors.items())
  header, start = safetensors_io.read_header(file)
  assert start % 8 == 0 and header["__metadata__"] == {"format": "pt"}
  assert header["b.c"]["dtype"] == "BF16" and header["scalar"]["shape"] == []
  with safetensors.safe_open(str(file), framework="numpy") as f:
    assert sorted(f.keys()) == sorted(tensors)
    for k, v in tensors.items():
      np.testing.assert_array_equal(f.get_tensor(k), v)
  got = dict(safetensors_io.read_tensors(safetensors_io.list_tensors([file])))
  assert got["b.c"].dtype == BF16
  for k, v in tensors.items():
    np.testing.assert_array_equal(got[k], v)


def test_bf16_raw_fallback_matches_library(tmp_path, monkeypatch):
  """The byte-range reader used when safetensors' numpy backend cannot return bf16."""
  x = np.random.default_rng(1).standard_normal((4, 6)).astype(BF16)
  file = tmp_path / "bf16.safetensors"
  safetensors_io.write_safetensors(file, [("w", x), ("v", x[0].astype(np.float32))])
  infos = safetensors_io.list_tensors([file])
  np.testing.assert_array_equal(safetensors_io._read_raw(infos["w"]), x)
  real_safe_open = safetensors.safe_open

  class NoBf16:
    """Mimics safetensors releases whose numpy backend rejects BF16."""

    def __init__(self, *a, **k):
      self._f = real_safe_open(*a, **k)

    def __enter__(self):
      self._inner = self._f.__enter__()
      return self

    def __exit__(self, *exc):
      return self._f.__exit__(*exc)

    def get_tensor(self, name):
      if self._inner.get_slice(name).get_dtype() == "BF16":
        raise TypeError("data type 'bfloat16' not understood")
      return self._inner.get_tensor(name)

  monkeypatch.setattr(safetensors_io.safetensors, "safe_open", NoBf16)
  got = dict(safetensors_io.read_tensors(infos, np.float32))
  np.testing.assert_array_equal(got["w"], x.astype(np.float32))
  np.testing.assert_array_equal(got["v"], x[0].astype(np.float32))


def test_bf16_written_by_torch_loads(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  t = torch.randn(3, 4, dtype=torch.bfloat16)
  save_file({"w": t}, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
  got = dict(safetensors_io.read_tensors(
      safetensors_io.list_tensors([tmp_path / "t.safetensors"]), np.float32))
  np.testing.assert_array_equal(got["w"], t.float().numpy())


@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_mistral", "tiny_llama"])
@pytest.mark.parametrize("shard", [None, 40_000])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip(tmp_path, helpers, name, shard, dtype):
  config = helpers.tiny(name)
  params = helpers.random_params(config)
  save_hf_checkpoint(tmp_path, config, params, max_shard_bytes=shard, dtype=dtype)
  files = sorted(p.name for p in tmp_path.iterdir())
  if shard:
    assert "model.safetensors.index.json" in files and "model-00001-of-" in files[1]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    sizes = {}
    for f in sorted(set(index["weight_map"].values())):
      header, _ = safetensors_io.read_header(tmp_path / f)
      sizes[f] = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
      assert {k for k in header if k != "__metadata__"} == {
          k for k, v in index["weight_map"].items() if v == f}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert len(sizes) > 1
  else:
    assert files == ["config.json", "model.safetensors"]
  hf_cfg = json.loads((tmp_path / "config.json").read_text())
  assert hf_cfg["dtype"] == dtype
  assert hf_cfg["model_type"] == {"tiny_gemma2": "gemma2", "tiny_mistral": "mistral",
                                  "tiny_llama": "llama"}[name]

  loaded_config, loaded = load_hf_checkpoint(tmp_path, dtype=None)
  assert loaded_config.replace(name=config.name) == config
  expected = params if dtype == "float32" else _cast_tree(params, BF16)
  helpers.assert_trees_equal(loaded, expected, rows=config.vocab_size)
  emb = loaded["embedder"]["input_embedding"]
  assert emb.dtype == np.dtype(dtype if dtype == "float32" else BF16)
  # Rows above the vocabulary are padding: HF does not store them, they come back as zeros.
  assert emb.shape[0] == config.embed_rows and not emb[config.vocab_size:].any()

  _, as_f32 = load_hf_checkpoint(tmp_path)  # default dtype float32
  assert all(v.dtype == np.float32 for v in _flat(as_f32).values())


def _flat(tree):
  return _common.flatten_tree(tree)


def _cast_tree(tree, dtype):
  return jax.tree.map(lambda x: np.asarray(x).astype(dtype), tree)


def test_preset_matching(tmp_path, helpers):
  config = get_config("tiny_gemma2")
  save_hf_checkpoint(tmp_path / "a", config, helpers.random_params(config))
  assert load_hf_checkpoint(tmp_path / "a")[0] is config
  other = config.replace(name="x", num_layers=2)
  save_hf_checkpoint(tmp_path / "b", other, helpers.random_params(other))
  loaded, params = load_hf_checkpoint(tmp_path / "b")
  assert loaded.num_layers == 2 and loaded.num_embed is None
  assert params["embedder"]["input_embedding"].shape == (512, 64)
  loaded, _ = load_hf_checkpoint(tmp_path / "a", match_preset=False)
  assert loaded.name == "gemma2" and loaded.num_embed is None


def _rewrite(path, mutate):
  """Rewrites a single-file checkpoint after `mutate(dict)` edits its tensors."""
  file = path / "model.safetensors"
  tensors = dict(safetensors_io.read_tensors(safetensors_io.list_tensors([file])))
  mutate(tensors)
  safetensors_io.write_safetensors(file, tensors.items())


def test_mismatch_lists_every_difference(tmp_path, helpers):
  config = get_config("tiny_mistral")
  save_hf_checkpoint(tmp_path, config, helpers.random_params(config), dtype="float32")

  def mutate(t):
    del t["model.layers.1.mlp.up_proj.weight"]
    del t["model.norm.weight"]
    t["model.layers.7.self_attn.q_proj.weight"] = np.zeros((4, 4), np.float32)
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    t["model.layers.2.mlp.down_proj.weight"] = np.zeros((64, 128), np.int32)

  _rewrite(tmp_path, mutate)
  with pytest.raises(CheckpointMismatchError) as e:
    load_hf_checkpoint(tmp_path)
  msg = str(e.value)
  for s in ("2 missing", "model.layers.1.mlp.up_proj.weight", "model.norm.weight",
            "1 unexpected", "model.layers.7.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight: checkpoint (16, 64), expected (32, 64)",
            "model.layers.2.mlp.down_proj.weight: int32"):
    assert s in msg, (s, msg)
  assert isinstance(e.value, ValueError)


def test_mismatched_config_is_reported_before_reading(tmp_path, helpers, monkeypatch):
  config = get_config("tiny_gemma2")
  save_hf_checkpoint(tmp_path, config, helpers.random_params(config))
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["intermediate_size"] = 96
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  monkeypatch.setattr(safetensors_io, "read_tensors",
                      lambda *a, **k: pytest.fail("tensor data read before validation"))
  with pytest.raises(CheckpointMismatchError, match=r"12 with the wrong shape"):
    load_hf_checkpoint(tmp_path)


def test_unsupported_architecture(tmp_path, helpers):
  config = get_config("tiny_mistral")
  save_hf_checkpoint(tmp_path, config, helpers.random_params(config))
  cfg = json.loads((tmp_path / "config.json").read_text())
  for model_type, archs, match in [
      ("mixtral", ["MixtralForCausalLM"], "model_type 'mixtral' is not supported"),
      ("gemma3", None, "model_type 'gemma3'"),
      ("mistral", ["LlamaForCausalLM"], "do not match model_type 'mistral'")]:
    bad = dict(cfg, model_type=model_type, architectures=archs)
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=match):
      load_hf_checkpoint(tmp_path)


def test_missing_files(tmp_path, helpers):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_hf_checkpoint(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf_checkpoint(tmp_path)
  config = get_config("tiny_mistral")
  save_hf_checkpoint(tmp_path / "s", config, helpers.random_params(config),
                     max_shard_bytes=50_000)
  shard = sorted((tmp_path / "s").glob("model-*.safetensors"))[1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=shard.name):
    load_hf_checkpoint(tmp_path / "s")
  save_hf_checkpoint(tmp_path / "p", config, helpers.random_params(config))
  (tmp_path / "p" / "model.safetensors").rename(tmp_path / "p" / "pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match="Pickled weights"):
    load_hf_checkpoint(tmp_path / "p")


def test_index_must_agree_with_shards(tmp_path, helpers):
  config = get_config("tiny_mistral")
  save_hf_checkpoint(tmp_path, config, helpers.random_params(config), max_shard_bytes=50_000)
  index_file = tmp_path / "model.safetensors.index.json"
  index = json.loads(index_file.read_text())
  first = sorted(set(index["weight_map"].values()))[0]
  assert index["weight_map"]["model.norm.weight"] != first
  index["weight_map"]["model.norm.weight"] = first
  index["weight_map"]["ghost.weight"] = first
  index_file.write_text(json.dumps(index))
  with pytest.raises(CheckpointMismatchError) as e:
    load_hf_checkpoint(tmp_path)
  assert "ghost.weight" in str(e.value) and "model.norm.weight: index says" in str(e.value)


def test_save_refuses_to_overwrite_and_clears_stale_shards(tmp_path, helpers):
  config = get_config("tiny_mistral")
  params = helpers.random_params(config)
  save_hf_checkpoint(tmp_path, config, params, max_shard_bytes=50_000)
  with pytest.raises(FileExistsError):
    save_hf_checkpoint(tmp_path, config, params)
  save_hf_checkpoint(tmp_path, config, params, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
  load_hf_checkpoint(tmp_path)


def test_save_checks_the_tree(tmp_path, helpers):
  config = get_config("tiny_mistral")
  params = helpers.random_params(config)
  with pytest.raises(CheckpointMismatchError, match="not\n?.*'params'|params to save"):
    save_hf_checkpoint(tmp_path, config, {"params": params})
  del params["layer_1"]["mlp"]
  with pytest.raises(CheckpointMismatchError, match="layer_1/mlp/linear/w"):
    save_hf_checkpoint(tmp_path, config, params)
  assert not (tmp_path / "config.json").exists()


def test_save_accepts_jax_arrays(tmp_path, helpers):
  config = get_config("tiny_gemma2")
  params = helpers.random_params(config)
  save_hf_checkpoint(tmp_path, config, jax.tree.map(jnp.asarray, params), dtype="float32")
  helpers.assert_trees_equal(load_hf_checkpoint(tmp_path)[1], params, rows=config.vocab_size)


# Malformed files: the library's CheckpointError naming the file, before tensor data is read.


def _good_file(tmp_path):
  from matquant_jax.checkpoints.safetensors_io import write_safetensors
  f = tmp_path / "model.safetensors"
  write_safetensors(f, [("a", np.arange(6, dtype=np.float32).reshape(2, 3)),
                        ("b", np.ones(4, np.float32))])
  return f


def _with_header(tmp_path, header: bytes, data: bytes = b"\0" * 64):
  f = tmp_path / "bad.safetensors"
  f.write_bytes(len(header).to_bytes(8, "little") + header + data)
  return f


@pytest.mark.parametrize("make, match", [
    (lambda d: _good_file(d).write_bytes(_good_file(d).read_bytes()[:-9]) and
     d / "model.safetensors", "past the end"),
    (lambda d: (lambda f: f.write_bytes(f.read_bytes()[:8] + b"\xff" + f.read_bytes()[9:]) and
                f)(_good_file(d)), "not UTF-8 JSON"),
    (lambda d: _with_header(d, b'{"a": {"dtype": "F32", "data_offsets": [0, 8]}}'),
     r"lacks \['shape'\]"),
    (lambda d: _with_header(d, b'{"a": "F32"}'), "header entry is a str"),
    (lambda d: _with_header(d, b'[1, 2, 3]'), "JSON list"),
    (lambda d: _with_header(d, b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": '
                               b'[0, 4096]}}'), "past the end"),
    (lambda d: _with_header(d, b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": '
                               b'[0, 4]}}'), "shape"),
    (lambda d: _with_header(d, b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": '
                               b'[0, 8]}}'), "data bytes"),
    (lambda d: (d / "short.safetensors").write_bytes(b"\1\2") and d / "short.safetensors",
     "shorter than"),
])
def test_malformed_safetensors_are_refused_by_name(tmp_path, make, match):
  from matquant_jax.checkpoints._common import CheckpointError
  from matquant_jax.checkpoints.safetensors_io import list_tensors
  f = make(tmp_path)
  with pytest.raises(CheckpointError, match=match) as e:
    list_tensors([f])
  assert str(f) in str(e.value)


def test_non_finite_tensor_is_refused_by_name(tmp_path):
  from matquant_jax.checkpoints._common import CheckpointError
  from matquant_jax.checkpoints.safetensors_io import list_tensors, read_tensors, write_safetensors
  f = tmp_path / "model.safetensors"
  write_safetensors(f, [("w", np.array([1.0, np.inf], np.float32))])
  with pytest.raises(CheckpointError, match="'w' holds NaN or infinite"):
    list(read_tensors(list_tensors([f])))


def test_negative_sliding_window_is_refused():
  from matquant_jax.models import hf_mapping
  d = {"model_type": "mistral", "num_attention_heads": 4, "hidden_size": 64,
       "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100,
       "sliding_window": -5}
  with pytest.raises(ValueError, match="sliding_window must be a positive int"):
    hf_mapping.config_from_hf_config(d)
