"""Tables in the paper's layout, the sweep over checkpoint slices, and the evaluate CLI."""

import json

import jax
import pytest

from matquant_jax.checkpoints.matquant_checkpoint import export_matquant_checkpoint
from matquant_jax.evaluation import report, sweep
from matquant_jax.models import get_config, init_params
from matquant_jax.quant.plan import PrecisionPlan


def _rec(method, bits, lp, acc, eff=None, plan=None):
  return {"method": method, "bits": bits, "plan": plan or f"ffn:int{bits}",
          "effective_bits": eff or float(bits), "log_pplx": lp,
          "tasks": {"arc_easy": {"acc": acc, "acc_norm": acc + 0.01}}, "task_avg": 100 * acc}


def test_rows_follow_the_papers_order():
  recs = [_rec("matquant", 2, 3.1, 0.5), _rec("baseline", 8, 2.4, 0.7), _rec("sliced_int8", 2, 9.0, 0.3),
          _rec("matquant", 8, 2.45, 0.69), _rec("baseline", 2, 3.3, 0.45), _rec("matquant", 6, 2.44, 0.7),
          {"method": "bf16", "bits": 16, "plan": "bf16", "effective_bits": 16.0, "log_pplx": 2.4,
           "task_avg": 71.0, "tasks": {}},
          _rec("mix_n_match", None, 3.0, 0.6, eff=3.0, plan="ffn:pyramid@3.0")]
  order = [(r["method"], r["bits"]) for r in report.sort_records(recs)]
  assert order == [("bf16", 16), ("baseline", 8), ("matquant", 8), ("sliced_int8", 2),
                   ("baseline", 2), ("matquant", 2), ("matquant", 6), ("mix_n_match", None)]
  md = report.to_markdown(recs)
  assert "| dtype | method | ARC-e | Task Avg | log pplx |" in md
  assert "| int2 | Sliced int8 | 31.00 | 30.00 | 9.000 |" in md
  assert "| 3.00b | Mix'n'Match |" in md
  csv = report.to_csv(recs).splitlines()
  assert csv[0].startswith("method,label,bits,plan,effective_bits,log_pplx,task_avg,arc_easy_acc")
  assert len(csv) == 1 + len(recs)


def test_write_tables(tmp_path):
  recs = [_rec("matquant", 4, 2.5, 0.6)]
  paths = report.write_tables(recs, tmp_path, name="t", title="demo")
  assert json.loads(paths["json"].read_text())[0]["log_pplx"] == 2.5
  assert paths["md"].read_text().startswith("**demo**")
  assert paths["csv"].exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  from matquant_jax.data import train_tokenizer, Tokenizer, kjv_documents
  d = tmp_path_factory.mktemp("sweep")
  cfg = get_config("tiny_gemma2")
  export_matquant_checkpoint(d / "mq", cfg, init_params(cfg, jax.random.key(0)), scope="ffn")
  train_tokenizer(list(kjv_documents("train"))[:200], str(d / "tok"), 512, family="gemma")
  return d, Tokenizer.from_file(d / "tok.model")


def test_sweep_records_match_direct_evaluation(tiny_checkpoint):
  d, tok = tiny_checkpoint
  opts = sweep.EvalOptions(ppl_source="kjv", ppl_seq_len=64, ppl_max_tokens=2000,
                           tasks=("kjv_verse_completion",), kjv_num_examples=8, batch_size=8)
  recs = sweep.evaluate_checkpoint(d / "mq", ["ffn:int8", "ffn:int2:ep", "ffn:pyramid@3.0"], tok,
                                   method="matquant", options=opts, log=lambda *_: None)
  assert [r["plan"] for r in recs] == ["ffn:int8", "ffn:int2:ep", "ffn:pyramid@3.0"]
  assert recs[0]["bits"] == 8 and recs[2]["bits"] is None
  assert 2.0 < recs[1]["effective_bits"] < 2.3 and recs[1]["extra_precision"]
  assert recs[2]["effective_bits"] == pytest.approx(3.0)
  from matquant_jax.checkpoints import MatQuantCheckpoint
  from matquant_jax.evaluation import perplexity
  ck = MatQuantCheckpoint.load(d / "mq")
  direct = perplexity.log_perplexity(ck.config, ck.params_for(PrecisionPlan.parse("ffn:int8"),
                                                              opts.dtype), tok, "kjv",
                                     seq_len=64, batch_size=8, max_tokens=2000)
  assert recs[0]["log_pplx"] == pytest.approx(direct["log_pplx"], rel=1e-6)
  for r in recs:
    assert 0 <= r["tasks"]["kjv_verse_completion"]["acc"] <= 1


def test_sweep_rejects_a_plan_before_evaluating(tiny_checkpoint):
  d, tok = tiny_checkpoint
  with pytest.raises(ValueError, match="quantizes \\['attn'\\]"):
    sweep.evaluate_checkpoint(d / "mq", ["ffn:int4", "ffn+attn:int4"], tok, method="matquant",
                              log=lambda *_: None)


def test_evaluate_cli(tiny_checkpoint, tmp_path):
  from matquant_jax import evaluate
  d, _ = tiny_checkpoint
  rc = evaluate.main([f"--checkpoint=matquant={d / 'mq'}", f"--checkpoint=baseline={d / 'mq'}",
                      f"--tokenizer={d / 'tok.model'}", f"--out={tmp_path}", "--bits=8,2",
                      "--mix=pyramid@3.0", "--tasks=", "--ppl_source=kjv", "--ppl_seq_len=64",
                      "--ppl_max_tokens=1000", "--dtype=float32"])
  assert rc == 0
  recs = json.loads((tmp_path / "table.json").read_text())
  assert {(r["method"], r["plan"]) for r in recs} == {
      ("matquant", "ffn:int8"), ("matquant", "ffn:int2"), ("mix_n_match", "ffn:pyramid@3.0"),
      ("baseline", "ffn:int8"), ("sliced_int8", "ffn:int2")}
  assert (tmp_path / "table.md").exists() and (tmp_path / "quality_vs_bits.png").exists()
  with pytest.raises(SystemExit):
    # The search would score itself on the text it searched on.
    evaluate.main([f"--checkpoint=matquant={d / 'mq'}", f"--tokenizer={d / 'tok.model'}",
                   f"--out={tmp_path}", "--mix=search@3.0", "--ppl_source=kjv",
                   "--search_split=validation", "--tasks="])
  with pytest.raises(SystemExit):
    evaluate.main([f"--checkpoint=qat={d / 'mq'}", f"--tokenizer={d / 'tok.model'}",
                   f"--out={tmp_path}"])


def test_evaluate_cli_searched_and_saved_plans(tiny_checkpoint, tmp_path):
  """search@ runs the budget search on the training split and evaluates it held out; a saved
  plan string and an Extra Precision checkpoint's Mix'n'Match are evaluated as given."""
  from matquant_jax import evaluate
  d, _ = tiny_checkpoint
  rc = evaluate.main([f"--checkpoint=matquant={d / 'mq'}",
                      f"--checkpoint=extra_precision={d / 'mq'}",
                      f"--tokenizer={d / 'tok.model'}", f"--out={tmp_path}", "--bits=2",
                      "--mix=search@3.0,ffn:[3,4/2,2,8],pyramid@3.0", "--tasks=",
                      "--ppl_source=kjv", "--ppl_seq_len=64", "--ppl_max_tokens=1000",
                      "--search_tokens=256", "--search_max_evals=30", "--dtype=float32"])
  assert rc == 0
  recs = json.loads((tmp_path / "table.json").read_text())
  plans = {(r["method"], r["plan"]) for r in recs}
  assert ("mix_n_match", "ffn:[3,4/2,2,8]") in plans
  assert ("mix_n_match", "ffn:pyramid@3.0:ep") in plans and ("mix_n_match", "ffn:[3,4/2,2,8]:ep") in plans
  searched = [r for r in recs if r["method"] == "mix_n_match_search"]
  assert len(searched) == 2 and {r["extra_precision"] for r in searched} == {False, True}
  assert all(r["plan"].startswith("ffn:[") and r["label"].startswith("Mix'n'Match search")
             for r in searched)


def test_minmax_rows_are_the_float_model_under_plain_minmax(tiny_checkpoint):
  """Fig. 1b's MinMax curve: the float model's FFN kernels under MinMax(r), no training; equal
  to serving the float weights at the plan ffn:int<r>:parent=<r> (the model's own fake quant)."""
  from matquant_jax.evaluation import perplexity
  d, tok = tiny_checkpoint
  cfg = get_config("tiny_gemma2")
  params = init_params(cfg, jax.random.key(0))
  opts = sweep.EvalOptions(ppl_source="kjv", ppl_seq_len=64, ppl_max_tokens=1000, tasks=(),
                           batch_size=8)
  recs = sweep.evaluate_minmax(cfg, params, tok, [8, 2], options=opts, log=lambda *_: None)
  assert [(r["method"], r["bits"], r["plan"]) for r in recs] == [
      ("minmax", 8, "ffn:int8"), ("minmax", 2, "ffn:int2:parent=2")]
  direct = perplexity.log_perplexity(cfg, params, tok, "kjv", plan="ffn:int2:parent=2",
                                     seq_len=64, batch_size=8, max_tokens=1000)
  assert recs[1]["log_pplx"] == pytest.approx(direct["log_pplx"], rel=1e-5)
  assert recs[1]["log_pplx"] > recs[0]["log_pplx"]
