"""What every command line shares: one way to report a user's mistake.

A mistake (a bad flag or config field, a missing or malformed file, a corrupted checkpoint) is
one line on stderr naming the problem and the fix, with exit code 2; anything else is a bug and
keeps its traceback. Library code raises these types (all ValueError or OSError subclasses):
`training.config.ConfigError`, `checkpoints._common.CheckpointError`, `training.aot.
TopologyError`, FileNotFoundError.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Sequence


def user_errors() -> tuple[type[BaseException], ...]:
  """The exception types that mean "the input is wrong", not "the library is wrong"."""
  from matquant_jax.checkpoints._common import CheckpointError
  from matquant_jax.training.aot import TopologyError
  from matquant_jax.training.config import ConfigError
  return (ConfigError, CheckpointError, TopologyError, FileNotFoundError)


def report(error: BaseException, prog: str) -> int:
  """Prints `error` as one line for `prog` and returns the exit code (2)."""
  kind = "config error" if type(error).__name__ == "ConfigError" else "error"
  text = " ".join(str(error).split()) if str(error) else type(error).__name__
  print(f"{prog}: {kind}: {text}", file=sys.stderr)
  return 2


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
    hint = (f"did you mean {suggestion.group(1)!r}?" if suggestion else
            "check the spelling against the config file")
    return (f"{culprit}: the config has no field {field!r}; {hint} (matquant_jax/training/"
            f"config.py and calibration/config.py list every field).")
  flat = " ".join(text.split())
  return (f"a --config override could not be applied ({type(error).__name__}: {flat}); "
          f"overrides: {' '.join(overrides) or 'none'}. Each must name an existing field and "
          f"give a value of its type, e.g. --config.num_steps=100.")


def absl_run(main: Callable[[list[str]], int]) -> None:
  """`absl.app.run(main)` whose flag errors (including --config.<field> overrides) are one line."""
  from absl import app
  from absl import flags

  def parse(argv):
    prog = argv[0].rsplit("/", 1)[-1] if argv else "matquant_jax"
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f"{prog}: flag error: {' '.join(str(e).split())}", file=sys.stderr)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      print(f"{prog}: config error: {_config_override_problem(argv, e)}", file=sys.stderr)
    sys.exit(2)

  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse)
