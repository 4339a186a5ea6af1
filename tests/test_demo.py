"""The built-in demo runs end to end (a shortened schedule), reuses finished stages and writes its
table and plots."""

import json


from matquant_jax import demo


def _summary(capsys) -> dict:
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_demo_end_to_end_short(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(demo, "DEMO_MODEL", "tiny_gemma2")
  monkeypatch.setattr(demo, "BASELINE_BITS", (8,))
  monkeypatch.setattr(demo, "MATQUANT_SLICES", (8, 4, 2))
  monkeypatch.setattr(demo, "MIX_BUDGETS", (3.0,))
  monkeypatch.setattr(demo, "SEARCH_BUDGETS", (3.0,))
  monkeypatch.setattr(demo, "OMNIQUANT_BASELINE_BITS", (2,))
  monkeypatch.setattr(demo, "MINMAX_BITS", (2,))
  args = ["--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
          "--pretrain_steps", "3", "--qat_steps", "2", "--seq_len", "32", "--batch", "8",
          "--eval_tokens", "1000", "--task_examples", "8", "--jobs", "1",
          "--omniquant_steps", "2", "--search_tokens", "256"]
  stages = ["baseline_int8", "matquant", "omniquant_baseline_int2",
            "omniquant_matquant", "pretrain"]
  # Training only: every stage trains, nothing is evaluated.
  assert demo.main(args + ["--train_only"]) == 0
  first = _summary(capsys)
  assert first["trained"] == stages and first["reused"] == []
  assert not (tmp_path / "out" / "table.json").exists()
  # The full demo over the same workdir reuses every stage and evaluates once.
  assert demo.main(args) == 0
  second = _summary(capsys)
  assert second["trained"] == [] and second["reused"] == stages
  table = json.loads((tmp_path / "out" / "table.json").read_text())
  methods = {(r["method"], r["bits"]) for r in table}
  assert {("bf16", 16), ("baseline", 8), ("sliced_int8", 4), ("sliced_int8", 2),
          ("matquant", 8), ("matquant", 4), ("matquant", 2)} <= methods
  assert sum(r["method"] == "mix_n_match" for r in table) == 4
  # The searched plan at the table's budget: a row, within budget; the sweep in its own JSON.
  (found,) = [r for r in table if r["method"] == "mix_n_match_search"]
  assert found["effective_bits"] <= 3.0 + 1e-9 and found["label"].startswith("search@3 ")
  swept = json.loads((tmp_path / "out" / "mixnmatch_search.json").read_text())
  assert [r["budget"] for r in swept] == [3.0] and all("held_out_log_pplx" in r for r in swept)
  assert {r["bits"] for r in table if r["method"] == "omniquant_matquant"} == {8, 4, 2}
  assert {r["bits"] for r in table if r["method"] == "omniquant_baseline"} == {2}
  assert {r["bits"] for r in table if r["method"] == "minmax"} == {2}
  # Like for like: every OmniQuant stage calibrates the pretrained bf16 weights, with the
  # paper's doubled int2 baseline budget.
  for name in ("omniquant_matquant", "omniquant_baseline_int2"):
    cfg = json.loads((tmp_path / "runs" / name / "config.json").read_text())
    assert cfg["init"] == f"run:{tmp_path / 'runs' / 'pretrain'}", cfg["init"]
  assert json.loads((tmp_path / "runs" / "omniquant_baseline_int2" / "config.json").read_text())[
      "calibration"]["steps_per_block"] == 4
  for r in table:
    assert {"method", "bits", "effective_bits", "log_pplx"} <= set(r)
    # Mix'n'Match, MinMax and OmniQuant-baseline rows are scored by log pplx alone (the
    # demo's time budget).
    assert "tasks" in r or r["method"] in ("mix_n_match", "mix_n_match_search", "minmax",
                                           "omniquant_baseline")
  for png in ("code_histograms.png", "quality_vs_bits.png", "mixnmatch_front.png"):
    assert (tmp_path / "out" / png).stat().st_size > 10_000


def test_on_an_accelerator_the_stages_run_one_at_a_time_in_process(monkeypatch, capsys):
  import jax
  assert demo._stage_workers(2) == 2  # the suite's CPU devices: worker processes
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert demo._stage_workers(1) == 1 and capsys.readouterr().out == ""
  assert demo._stage_workers(2) == 1
  assert "--jobs=2: on tpu the stages run one at a time" in capsys.readouterr().out
