"""Mix'n'Match search: the exact budget solver, evaluation counts, refusals and the CLI."""

from __future__ import annotations

import gzip
import itertools
import json
import pathlib

import jax
import numpy as np
import pytest

from matquant_jax import mixnmatch
from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
from matquant_jax.checkpoints.matquant_checkpoint import export_matquant_checkpoint
from matquant_jax.data import train_tokenizer
from matquant_jax.evaluation import search
from matquant_jax.models import get_config
from matquant_jax.models import init_params
from matquant_jax.quant.plan import PrecisionPlan

CORPUS = pathlib.Path(__file__).resolve().parents[2] / "data" / "kjv.txt.gz"


# The exact solver against brute force.


def _brute_force(costs, sizes, widths, capacity):
  best = None
  for levels in itertools.product(range(len(widths)), repeat=len(sizes)):
    used = sum(s * widths[j] for s, j in zip(sizes, levels))
    if used <= capacity:
      cost = sum(costs[u, j] for u, j in enumerate(levels))
      best = cost if best is None else min(best, cost)
  return best


@pytest.mark.parametrize("seed", range(12))
def test_solver_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  num_units = int(rng.integers(1, 6))
  widths = sorted(rng.choice([1, 2, 3, 4, 6, 8], size=int(rng.integers(2, 5)), replace=False))
  sizes = [int(s) for s in rng.choice([64, 128, 192, 256], size=num_units)]
  # Costs fall with width, as KL does, but not in step between units.
  costs = np.sort(rng.exponential(1.0, (num_units, len(widths))), axis=1)[:, ::-1].copy()
  capacity = float(rng.uniform(widths[0], widths[-1]) * sum(sizes))
  levels = search.solve_budget(costs, sizes, widths, capacity)
  used = sum(s * widths[j] for s, j in zip(sizes, levels))
  assert used <= capacity
  got = sum(costs[u, j] for u, j in enumerate(levels))
  np.testing.assert_allclose(got, _brute_force(costs, sizes, widths, capacity), rtol=1e-12)


def test_solver_coarsened_table_keeps_the_budget():
  rng = np.random.default_rng(0)
  sizes = [1001, 999, 1003, 997]  # gcd 1: a fine table, coarsened by max_cells
  widths = [2, 4, 8]
  costs = np.sort(rng.exponential(1.0, (4, 3)), axis=1)[:, ::-1].copy()
  capacity = 4.0 * sum(sizes)
  levels = search.solve_budget(costs, sizes, widths, capacity, max_cells=400)
  assert sum(s * widths[j] for s, j in zip(sizes, levels)) <= capacity


def test_solver_refuses_an_impossible_budget():
  with pytest.raises(ValueError, match="narrowest width 2"):
    search.solve_budget(np.zeros((2, 2)), [10, 10], [2, 4], 39.0)


def test_evaluation_count_for_gemma2_9b_stays_within_200():
  # 42 layers x 3 FFN kernels x 5 widths: step 1 is measured per layer.
  count = search.evaluation_count(42, (2, 3, 4, 6, 8), 8, 200, "kernel")
  assert count["sensitivity"] == 42 * 4
  assert count["total"] == 200
  assert count["reference"] + count["sensitivity"] + count["seeds"] + count["refinement"] == 200


@pytest.mark.parametrize("calib, evaluation", [
    (("kjv", "validation"), ("kjv", "validation")),
    (("kjv", "all"), ("kjv", "validation")),
    (("tfds:c4/en", "validation[:50%]"), ("tfds:c4/en", "validation")),
])
def test_overlapping_texts_are_refused(calib, evaluation):
  with pytest.raises(ValueError, match="same text"):
    search.check_disjoint(calib, evaluation)


def test_disjoint_texts_pass():
  search.check_disjoint(("kjv", "train"), ("kjv", "validation"))
  search.check_disjoint(("tfds:c4/en", "train"), ("tfds:c4/en", "validation"))


# Searching a real (tiny) checkpoint.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """An FFN-quantized tiny Gemma-2 int8 checkpoint with a tokenizer beside it."""
  root = tmp_path_factory.mktemp("mixnmatch")
  with gzip.open(CORPUS, "rt", encoding="utf-8") as fh:
    lines = [next(fh).rstrip("\n") for _ in range(3000)]
  tok = train_tokenizer(iter(lines), root / "tokenizer", 512, family="gemma")
  config = get_config("tiny_gemma2")
  params = init_params(config, jax.random.key(5, impl="rbg"))
  path = export_matquant_checkpoint(root / "matquant_int8", config, params, scope="ffn")
  return MatQuantCheckpoint.load(path), tok, root


@pytest.mark.parametrize("granularity", ["layer", "kernel"])
def test_search_meets_the_budget_and_beats_its_seeds(tiny, granularity):
  ckpt, tok, _ = tiny
  options = search.SearchOptions(granularity=granularity, seq_len=64, batch_size=4, tokens=512,
                                 max_evals=40)
  logs = []
  results, sens = search.run(ckpt, tok, [3.0, 5.0], options, log=logs.append)
  assert "at most 40" in logs[0]  # the evaluation count comes before any evaluation
  assert sens.costs.shape == (len(sens.units), 5)
  # A unit's KL grows as its width shrinks, and is zero at the parent width.
  assert np.all(np.diff(sens.costs, axis=1) <= 1e-6) and np.all(sens.costs[:, -1] == 0)
  for r in results:
    assert r.effective_bits <= r.budget + 1e-9
    assert r.evaluations <= 40
    assert PrecisionPlan.parse(str(r.plan)) == r.plan
    assert r.calibration_kl <= r.solver_kl + 1e-12
    assert all(r.calibration_kl <= kl + 1e-12 for kl in r.fixed_kl.values())
    if granularity == "kernel":
      assert all(isinstance(e, (int, tuple)) for e in r.plan.layer_bits(4))
  assert results[0].calibration_kl > results[1].calibration_kl  # more bits, closer to int8


def test_scorer_matches_the_plan_forward(tiny):
  """The scorer's KL of a plan equals the KL computed from two plain forwards."""
  ckpt, tok, _ = tiny
  from matquant_jax.evaluation import perplexity
  batches, _ = perplexity.packed_sample(tok, "kjv", split="train", seq_len=32, batch_size=2,
                                        max_tokens=128, vocab_size=ckpt.config.vocab_size)
  scorer = search.PlanScorer(ckpt, batches)
  plan = PrecisionPlan.parse("ffn:[2/4,8,3,6/2]")
  widths = {n: ckpt.slice_bits(plan, n) for n in ckpt.qtensors}
  got = scorer.score(widths)
  fwd = perplexity.model_forward(ckpt.config, PrecisionPlan.bf16())
  ref_p, q_p = ckpt.params_for(PrecisionPlan.uniform(8), np.float32), ckpt.params_for(plan,
                                                                                      np.float32)
  total = count = 0.0
  for b in batches:
    lr = jax.nn.log_softmax(fwd(ref_p, b["inputs"], b["positions"], b["segment_ids"]), -1)
    lq = jax.nn.log_softmax(fwd(q_p, b["inputs"], b["positions"], b["segment_ids"]), -1)
    kl = np.sum(np.exp(lr) * (lr - lq), -1)
    total += float(np.sum(kl * b["loss_mask"]))
    count += float(np.sum(b["loss_mask"]))
  np.testing.assert_allclose(got, total / count, rtol=1e-4)


def test_cli_prints_a_plan_and_refuses_overlap(tiny, capsys):
  ckpt, _, root = tiny
  assert (root / "tokenizer.model").exists()
  out = root / "out"
  rc = mixnmatch.main([f"--checkpoint={ckpt.path}", "--budget=3.0,4.5", "--seq_len=64",
                       "--batch_size=4", "--calib_tokens=512", "--max_evals=30",
                       f"--out={out}"])
  assert rc == 0
  lines = capsys.readouterr().out.splitlines()
  plan_lines = [l for l in lines if l.startswith("ffn:")]
  assert len(plan_lines) == 2
  rows = [json.loads(l) for l in lines if l.startswith("{")]
  assert [r["plan"] for r in rows] == plan_lines
  assert json.loads((out / "search.json").read_text())["results"][0]["budget"] == 3.0
  assert (out / "pareto.png").stat().st_size > 0
  with pytest.raises(SystemExit) as e:
    mixnmatch.main([f"--checkpoint={ckpt.path}", "--budget=3.0", "--eval_source=kjv",
                    "--calib_split=validation"])
  assert e.value.code == 2
  assert "same text" in capsys.readouterr().err


def test_cli_dry_run_counts_without_loading(tiny, capsys):
  ckpt, _, _ = tiny
  assert mixnmatch.main([f"--checkpoint={ckpt.path}", "--budget=3.0", "--dry_run",
                         "--granularity=kernel"]) == 0
  info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert info["evaluations_per_budget"]["sensitivity"] == 4 * 4
  with pytest.raises(SystemExit):
    mixnmatch.main([f"--checkpoint={ckpt.path}", "--budget=3.0", "--widths=2,9"])
  assert "1..8" in capsys.readouterr().err


def test_byte_budget_counts_codes_and_statistics(tiny):
  ckpt, tok, _ = tiny
  four_bits = search.kernel_bytes(ckpt, {n: 4 for n in ckpt.qtensors})
  options = search.SearchOptions(unit="bytes", seq_len=64, batch_size=4, tokens=256,
                                 max_evals=25)
  (r,), _ = search.run(ckpt, tok, [four_bits], options, log=lambda *_: None)
  assert r.kernel_bytes <= four_bits
  assert r.fixed_kl == {}  # the fixed layouts are defined by bits, not bytes
  with pytest.raises(ValueError, match="narrowest width"):
    search.run(ckpt, tok, [four_bits // 4], options, log=lambda *_: None)
