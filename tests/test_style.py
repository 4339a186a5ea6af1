"""House rules a reviewer would otherwise check by hand."""

import ast
import pathlib

import matquant_jax

PACKAGE = pathlib.Path(matquant_jax.__file__).parent
MAX_LINES = 60


def _code_lines(fn: ast.FunctionDef) -> int:
  lines = fn.end_lineno - fn.lineno + 1
  first = fn.body[0]
  if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
    lines -= first.end_lineno - first.lineno + 1
  return lines


def test_long_functions_say_why():
  offenders = []
  for path in sorted(PACKAGE.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
          _code_lines(node) > MAX_LINES and "Long:" not in (ast.get_docstring(node) or ""):
        offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} "
                         f"({_code_lines(node)} lines)")
  assert not offenders, ("functions over 60 lines (docstring aside) need a 'Long: <why>' line "
                         "in their docstring, or a split: " + "; ".join(offenders))


def test_no_argparse():
  # Every command takes absl flags (matquant_jax/cli.py).
  users = [p.name for p in PACKAGE.rglob("*.py") if "import argparse" in p.read_text()]
  assert not users, users
