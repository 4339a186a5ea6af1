"""A user's own HF checkpoint (no preset, BPE tokenizer.json only) through every command.

The checkpoint is a tiny Llama-architecture model written in both transformers layouts:
5.x (`rope_parameters`, `dtype`, tied embeddings) and 4.x (top-level `rope_theta`,
`torch_dtype`, untied, explicit `head_dim`), with a byte-level BPE tokenizer trained by
`tokenizers` on the bundled text and no `tokenizer.model`.
"""

from __future__ import annotations

import gzip
import itertools
import json
import pathlib

import numpy as np
import pytest

from matquant_jax import checkpoints
from matquant_jax.checkpoints import weight_source
from matquant_jax.data import tokenizer as tokenizer_lib
from matquant_jax.models.config import AttentionPattern
from matquant_jax.models.config import get_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _kjv_lines(n=3000):
  with gzip.open(REPO / "data" / "kjv.txt.gz", "rt", encoding="utf-8") as fh:
    return [line.strip() for line in itertools.islice(fh, n) if line.strip()]


def write_bpe_tokenizer(directory: pathlib.Path, vocab_size: int = 320) -> int:
  """A SmolLM-style byte-level BPE tokenizer.json (no BOS added); returns its vocab size."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(_kjv_lines(), trainer)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
      "chat_template": CHATML, "tokenizer_class": "GPT2Tokenizer"}))
  return tok.get_vocab_size()


def own_config(vocab: int, *, tied: bool):
  # Llama shape that matches no preset: GQA, full attention, its own vocabulary.
  return get_config("tiny_mistral").replace(
      name="my_llama", attention_pattern=AttentionPattern.GLOBAL, sliding_window=None,
      vocab_size=vocab, num_embed=None, tie_embeddings=tied, bos_id=0, eos_id=2, pad_id=0,
      rope_base=50_000.0, norm_eps=1e-5)


def write_checkpoint(directory: pathlib.Path, layout: str) -> tuple:
  """Writes a tiny HF Llama directory in transformers `layout` ('5' or '4')."""
  directory.mkdir(parents=True)
  vocab = write_bpe_tokenizer(directory)
  config = own_config(vocab, tied=layout == "5")
  rng = np.random.default_rng(0)
  from matquant_jax.checkpoints import _common
  params = _common.unflatten_tree({
      n: (rng.standard_normal(s) * (0.02 if "norm" not in n else 0.1) +
          (1.0 if "norm" in n else 0.0)).astype(np.float32)
      for n, s in _common.expected_param_shapes(config).items()})
  checkpoints.save_hf_checkpoint(directory, config, params, dtype="float32", model_type="llama")
  cfg_file = directory / "config.json"
  d = json.loads(cfg_file.read_text())
  if layout == "5":
    d.pop("rope_theta", None)
    d.pop("torch_dtype", None)
    d.pop("head_dim", None)     # derived: hidden_size / num_attention_heads
  else:
    d.pop("rope_parameters", None)
    d.pop("dtype", None)
  d["bos_token_id"], d["eos_token_id"] = 0, 2
  cfg_file.write_text(json.dumps(d, indent=2))
  return config, params


@pytest.fixture(scope="module")
def own_ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp("own")
  config, params = write_checkpoint(root / "my_llama", "5")
  return root, root / "my_llama", config, params


def _cli(module, *args):
  """The command's main(argv) in this process (what `python -m module` runs after absl's
  setup): its exit code and what it printed. A subprocess per command only re-imported jax."""
  import contextlib
  import importlib
  import io
  import types
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = importlib.import_module(module).main(list(args))
  return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.mark.parametrize("layout", ["5", "4"])
def test_config_read_from_the_checkpoint_not_a_preset(tmp_path, layout):
  config, params = write_checkpoint(tmp_path / "ckpt", layout)
  loaded, loaded_params = checkpoints.load_hf_checkpoint(tmp_path / "ckpt")
  assert loaded.replace(name=config.name) == config   # every field from config.json
  assert weight_source.architecture(f"hf:{tmp_path / 'ckpt'}") == loaded
  np.testing.assert_array_equal(loaded_params["layer_0"]["mlp"]["linear"]["w"],
                                params["layer_0"]["mlp"]["linear"]["w"])


@pytest.mark.parametrize("key,value,needle", [
    ("num_local_experts", 8, "mixture-of-experts"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "RoPE scaling 'llama3'"),
    ("attention_bias", True, "attention biases"),
    ("model_type", "qwen2", "model_type 'qwen2'"),
])
def test_unsupported_features_refused_by_name(tmp_path, own_ckpt, key, value, needle):
  _, src, _, _ = own_ckpt
  d = json.loads((src / "config.json").read_text())
  d[key] = value
  (tmp_path / "config.json").write_text(json.dumps(d))
  # No weights at all: the refusal must come from config.json alone.
  with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
    checkpoints.load_hf_checkpoint(tmp_path)


def test_hf_tokenizer_special_ids_bos_and_chat(own_ckpt):
  _, src, _, _ = own_ckpt
  tok = tokenizer_lib.open_tokenizer(src)   # a directory with tokenizer.json only
  assert isinstance(tok, tokenizer_lib.HFTokenizer)
  assert (tok.bos_id, tok.eos_id) == (0, 2)
  assert tok.add_bos_default is False        # this model adds no BOS
  ids = tok.encode("In the beginning God created")
  assert ids[0] != tok.bos_id and tok.decode(ids) == "In the beginning God created"
  assert tok.encode(["a b", "c"], add_bos=True, add_eos=True)[1][0] == 0
  prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
  assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  import pickle  # data-loader workers get a copy; the library itself never unpickles files
  assert pickle.loads(pickle.dumps(tok)).encode("God") == tok.encode("God")


def test_sample_errors_come_before_the_model_loads(own_ckpt, tmp_path, monkeypatch, capsys):
  """Each mistake is one line and exit code 2, and the weights are never read. In this process
  (the CLI's own flag parsing and main; a subprocess per case only re-imports jax)."""
  from matquant_jax import sample

  def must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the mistake was reported")

  monkeypatch.setattr(sample, "load_model", must_not_load)
  root, src, _, _ = own_ckpt
  cases = [
      ([f"--checkpoint={tmp_path / 'missing'}", "--prompt=x"], "no such directory"),
      ([f"--checkpoint=hf:{src}", "--prompt=   "], "prompt 1 is empty"),
      ([f"--checkpoint=hf:{src}", "--prompt=x", "--max_new_tokens=100000"], "--max_length"),
      ([f"--checkpoint=hf:{src}", "--prompt=x", "--plan=ffn:int9"], "--plan"),
      ([f"--checkpoint=hf:{src}", "--prompt=x", f"--tokenizer={tmp_path}/t.json"],
       "does not exist"),
  ]
  for args, needle in cases:
    code = sample.main(args)
    err = capsys.readouterr().err
    assert code == 2, (args, err[-2000:])
    assert needle in err and len(err.strip().splitlines()) == 1, (args, err[-2000:])


def test_train_evaluate_sample_export_through_the_clis(own_ckpt):
  root, src, config, _ = own_ckpt
  work = root / "run"
  r = _cli("matquant_jax.train", f"--config={REPO / 'configs' / 'tiny_qat.py'}",
           f"--workdir={work}",
           "--config.model=auto", f"--config.init=hf:{src}", "--config.tokenizer=auto",
           "--config.num_steps=3", "--config.data.seq_len=32",
           "--config.data.global_batch_size=8", "--config.mesh.fsdp=1",
           "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
           "--config.optimizer.warmup_steps=1")
  assert r.returncode == 0, r.stderr[-3000:]
  export = work / "matquant_int8"
  assert (export).is_dir() and (work / "tokenizer" / "tokenizer.json").is_file()
  assert json.loads((work / "model_config.json").read_text())["vocab_size"] == config.vocab_size

  out = root / "eval"
  r = _cli("matquant_jax.evaluate", f"--checkpoint=matquant={export}", f"--out={out}",
           "--bits=8,2", "--tasks=", "--ppl_source=kjv", "--ppl_seq_len=32",
           "--ppl_max_documents=4", "--batch_size=4", "--dtype=float32")
  assert r.returncode == 0, r.stderr[-3000:]
  rows = json.loads((out / "table.json").read_text())
  rows = rows["records"] if isinstance(rows, dict) else rows
  assert {row["bits"] for row in rows} >= {8, 2}
  assert all(np.isfinite(row["log_pplx"]) for row in rows)

  # The float checkpoint at a plan (MinMax on the fly) and the int8 export with the chat
  # template; the tokenizer is found next to each.
  for ckpt, extra in ((f"hf:{src}", []), (str(export), ["--chat"])):
    r = _cli("matquant_jax.sample", f"--checkpoint={ckpt}", "--plan=ffn:int4",
             "--prompt=In the beginning", "--max_new_tokens=4", "--nowarmup", "--json", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["generated_tokens"] >= 1 and result["plan"].startswith("ffn:int4")

  r = _cli("matquant_jax.export_hf", f"--checkpoint={export}", "--plan=ffn:int2",
           f"--out={root / 'hf_int2'}", "--dtype=float32")
  assert r.returncode == 0, r.stderr[-3000:]
  assert (root / "hf_int2" / "tokenizer.json").is_file()
  back_cfg, back = checkpoints.load_hf_checkpoint(root / "hf_int2")
  assert json.loads((root / "hf_int2" / "config.json").read_text())["model_type"] == "llama"
  from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
  import jax.numpy as jnp
  want = MatQuantCheckpoint.load(export).params_for(
      __import__("matquant_jax").quant.plan.PrecisionPlan.parse("ffn:int2"), dtype=jnp.float32)
  np.testing.assert_array_equal(back["layer_1"]["mlp"]["linear"]["w"],
                                np.asarray(want["layer_1"]["mlp"]["linear"]["w"]))
  assert back_cfg.replace(name=config.name) == config


def test_transformers_loads_our_llama_and_the_int2_export(own_ckpt, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  _, src, config, params = own_ckpt
  model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(src))
  tok = tokenizer_lib.open_tokenizer(src)
  text = "And God said, Let there be light"
  assert hf_tok(text, add_special_tokens=True)["input_ids"] == tok.encode(text)
  ids = np.array([tok.encode(text)], np.int64)
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  import jax.numpy as jnp
  from matquant_jax.models import transformer
  ours = transformer.Transformer(config, dtype=jnp.float32).apply(
      {"params": params}, jnp.asarray(ids, jnp.int32))
  ours = ours[0] if isinstance(ours, tuple) else ours
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4, rtol=2e-4)


def test_calibration_and_paper_configs_take_the_checkpoints_architecture(own_ckpt):
  from matquant_jax.calibration import config as calib_config
  from matquant_jax.training import config as train_config
  from matquant_jax.training import trainer
  _, src, config, _ = own_ckpt
  c = calib_config.default_config()
  c.model, c.init = "auto", f"hf:{src}"
  assert calib_config.resolve(c).model.replace(name=config.name) == config
  q = train_config.paper_qat_config("auto")
  q.init, q.tokenizer = f"hf:{src}", "auto"
  setup = trainer.resolve(q)
  assert setup.model.replace(name=config.name) == config
  assert setup.objective.weights == (0.2, 0.2, 1.0)   # Llama-style norms: the mistral λ
  q.init = "random"
  with pytest.raises(trainer.ConfigError, match="takes the architecture from"):
    trainer.resolve(q)
