"""cli.py: one flag style and one error line for every command."""

import pytest
from absl import flags

from matquant_jax import cli
from matquant_jax import demo
from matquant_jax import evaluate
from matquant_jax import export_hf
from matquant_jax import mixnmatch


def _flags():
  fv = flags.FlagValues()
  flags.DEFINE_integer("steps", 3, "Steps.", flag_values=fv)
  flags.DEFINE_bool("fast", False, "Go fast.", flag_values=fv)
  return fv


def test_parse_flags_is_reentrant_and_refuses_bad_input(capsys):
  fv = _flags()
  cli.parse_flags(fv, ["--steps=5", "--fast"], "tool")
  assert fv.steps == 5 and fv.fast
  cli.parse_flags(fv, ["--steps", "7"], "tool")  # a second call starts from the defaults
  assert fv.steps == 7 and not fv.fast
  for argv, needle in ((["--stepz=1"], "Unknown command line flag 'stepz'"),
                       (["--steps=x"], "steps"), (["positional"], "unexpected argument")):
    with pytest.raises(SystemExit) as e:
      cli.parse_flags(fv, argv, "tool")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tool: error: ") and needle in err and err.count("\n") == 1
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(fv, ["--help"], "tool")
  assert e.value.code == 0 and "--steps" in capsys.readouterr().out


def test_commands_keep_their_flags_apart():
  # The same flag name in several commands, all importable in one process.
  names = [set(m.FLAGS) for m in (evaluate, demo, export_hf)]
  mixnmatch._define_flags()
  names.append(set(mixnmatch.FLAGS))
  assert all("out" in n for n in names)
  assert "--out" not in {f"--{n}" for n in flags.FLAGS}
  from matquant_jax import calibrate, train
  assert {"config", "workdir"} <= set(train.FLAGS) & set(calibrate.FLAGS)
  assert "config" not in flags.FLAGS


def test_error_is_one_line(capsys):
  assert cli.error("tool", "bad\n  value", code=3) == 3
  assert capsys.readouterr().err == "tool: error: bad value\n"


def test_check_minimums_names_the_first_flag_below_its_minimum(capsys):
  import types
  cli.check_minimums("tool", types.SimpleNamespace(a=1, b=None), {"a": 1, "b": 5})
  with pytest.raises(SystemExit) as e:
    cli.check_minimums("tool", types.SimpleNamespace(a=0, b=1), {"a": 1, "b": 5})
  assert e.value.code == 2 and capsys.readouterr().err == "tool: error: --a=0 must be >= 1.\n"
