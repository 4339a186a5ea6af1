"""What every command line shares: absl flags and one way to report a user's mistake.

Every command (train, calibrate, evaluate, mixnmatch, sample, export_hf, demo) takes absl
`--flag=value` flags, each command in its own FlagValues (`parse_flags`; train and calibrate
through `parse_config_flags`, which adds ml_collections' `--config.<field>` overrides), so every
`main(argv)` can run in one process; `run_main` is the `python -m` entry point.

A mistake (a bad flag or config field, a missing or malformed file, a corrupted checkpoint) is
one line on stderr naming the problem and the fix, with exit code 2; anything else is a bug and
keeps its traceback. Library code raises these types (all ValueError or OSError subclasses):
`training.config.ConfigError`, `checkpoints._common.CheckpointError`, `training.aot.
TopologyError`, FileNotFoundError.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Mapping, NoReturn, Sequence


def user_errors() -> tuple[type[BaseException], ...]:
  """The exception types that mean "the input is wrong", not "the library is wrong"."""
  from matquant_jax.checkpoints._common import CheckpointError
  from matquant_jax.training.aot import TopologyError
  from matquant_jax.training.config import ConfigError
  return (ConfigError, CheckpointError, TopologyError, FileNotFoundError)


def error(prog: str, message: str, *, kind: str = "error", code: int = 2) -> int:
  """Prints `prog: kind: message` as one line on stderr and returns the exit code: the one
  way every command reports a mistake."""
  print(f"{prog}: {kind}: {' '.join(str(message).split())}", file=sys.stderr)
  return code


def report(exc: BaseException, prog: str) -> int:
  """Prints a user error (see user_errors) as one line for `prog` and returns 2."""
  kind = "config error" if type(exc).__name__ == "ConfigError" else "error"
  return error(prog, str(exc) or type(exc).__name__, kind=kind)


def _config_override_problem(argv: Sequence[str], error: BaseException) -> str:
  """A readable account of an ml_collections override error (unknown field or bad value)."""
  text = str(error)
  name = re.search(r"'([A-Za-z0-9_]+)\\?'", text)
  name = name.group(1) if name else ""
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  overrides = [a for a in argv if a.startswith("--config.")]
  culprit = next((a for a in overrides
                  if name and a.split("=", 1)[0].split(".")[-1] == name), None)
  if isinstance(error, (AttributeError, KeyError)) and culprit:
    field = culprit.split("=", 1)[0][len("--config."):]
    return _no_field(culprit, field, suggestion.group(1) if suggestion else None)
  flat = " ".join(text.split())
  return (f"a --config override could not be applied ({type(error).__name__}: {flat}); "
          f"overrides: {' '.join(overrides) or 'none'}. Each must name an existing field and "
          f"give a value of its type, e.g. --config.num_steps=100.")


def run_main(main: Callable[[list[str]], int]) -> None:
  """`absl.app.run` for a command whose `main(argv)` parses its own FlagValues: app.run sets up
  absl logging and exits with main's code; main gets the command line after the program name."""
  from absl import app
  from absl import flags

  def pass_through(argv):
    flags.FLAGS.mark_as_parsed()  # absl's own flags keep their defaults
    return argv

  app.run(lambda argv: sys.exit(main(argv[1:])), flags_parser=pass_through)


def parse_config_flags(flag_values, argv: Sequence[str] | None, prog: str) -> None:
  """parse_flags for a command with an ml_collections config flag: a bad --config.<field>
  override (unknown field, ill-typed value) is one line naming it, exit 2."""
  from absl import flags
  args = list(sys.argv[1:] if argv is None else argv)
  saved = sys.argv
  # ml_collections defines the --config.<field> override flags from sys.argv when --config is
  # parsed, so a main(argv) called in a running process must show it its own command line.
  sys.argv = [prog] + args
  for name in [n for n in flag_values if n.startswith("config.")]:
    delattr(flag_values, name)  # a previous parse's override flags: this parse defines its own
  try:
    parse_flags(flag_values, args, prog, unknown_ok=True)
  except flags.UnrecognizedFlagError as e:
    fail(prog, _unknown_field(args, e.flagname, flag_values) if e.flagname.startswith(
        "config.") else f"{e} (--help lists the flags)")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    fail(prog, _config_override_problem(args, e))
  finally:
    sys.argv = saved


def _unknown_field(argv: Sequence[str], flagname: str, flag_values) -> str:
  """The message for --config.<field> naming no field of the loaded config (absl reports it
  as an unknown flag when the override is parsed outside absl.app.run)."""
  import difflib
  field = flagname[len("config."):]
  culprit = next((a for a in argv if a.split("=", 1)[0] == f"--{flagname}"), f"--{flagname}")
  try:
    config = flag_values["config"].value
    fields = _field_paths(config.to_dict() if config is not None else {})
  except (AttributeError, KeyError, flags.Error):
    fields = []
  close = difflib.get_close_matches(field, fields, n=1)
  return _no_field(culprit, field, close[0] if close else None)


def _no_field(culprit: str, field: str, suggestion: str | None) -> str:
  """The one wording of "--config.<field> names no field", however the parser reported it."""
  hint = (f"did you mean {suggestion!r}?" if suggestion else
          "check the spelling against the config file")
  return (f"{culprit}: the config has no field {field!r}; {hint} (matquant_jax/training/"
          f"config.py and calibration/config.py list every field).")


def _field_paths(tree: Mapping, prefix: str = "") -> list[str]:
  out = []
  for k, v in tree.items():
    out.extend(_field_paths(v, f"{prefix}{k}.") if isinstance(v, Mapping) else [f"{prefix}{k}"])
  return out


def fail(prog: str, message: str) -> NoReturn:
  """A usage mistake found while checking a command's flags: one line on stderr, exit 2."""
  raise SystemExit(error(prog, message))


def check_minimums(prog: str, values, minimums: Mapping[str, int]) -> None:
  """Each named flag of `values` (FlagValues or a namespace) is unset (None) or >= its minimum;
  the first that is not is one error line naming it."""
  for name, minimum in minimums.items():
    value = getattr(values, name)
    if value is not None and value < minimum:
      fail(prog, f"--{name}={value} must be >= {minimum}.")


def parse_flags(flag_values, argv: Sequence[str] | None, prog: str, *,
                unknown_ok: bool = False) -> None:
  """Parses `argv` (default sys.argv[1:]) into a command's own absl FlagValues.

  Each command keeps its flags in its own FlagValues, so commands importable in one process
  (tests, notebooks) never collide on a flag name, and `main(argv)` can be called again.
  --help prints the flags and exits 0; an unknown flag, a bad value or a stray positional
  argument is one line and exit 2.
  """
  from absl import flags
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--help" in argv or "-h" in argv or "--helpfull" in argv:
    print(f"usage: python -m matquant_jax.{prog} [flags]\n\n{flag_values.get_help()}")
    raise SystemExit(0)
  if flag_values.is_parsed():  # a second main() in one process
    flag_values.unparse_flags()
  try:
    rest = flag_values([prog] + argv)[1:]
  except flags.Error as e:
    if unknown_ok and isinstance(e, flags.UnrecognizedFlagError):
      raise  # the caller words it (parse_config_flags)
    fail(prog, f"{e} (--help lists the flags)")
  if rest:
    fail(prog, f"unexpected argument(s) {rest}; every option is a --flag=value.")
