"""The public API: ``trquant``, ``trquant.nnx``, ``trquant.adaround`` and ``trquant.export``.

Every name in an ``__all__`` exists; the README, the docs and the examples use public
names only (``trquant.<module>.<name>`` with ``<name>`` in that module's ``__all__``) and
never import ``trquant._src``.
"""

import inspect
import pathlib
import re

import pytest

import trquant

ROOT = pathlib.Path(__file__).resolve().parent.parent
PUBLIC = {"": trquant, "nnx": trquant.nnx, "adaround": trquant.adaround,
          "export": trquant.export}
SUBMODULES = {"nnx", "adaround", "export"}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_exported_name_exists_and_is_documented(module):
  namespace = PUBLIC[module]
  for name in namespace.__all__:
    value = getattr(namespace, name)
    if module == "" and name in SUBMODULES:
      continue
    assert getattr(value, "__doc__", None), f"trquant.{module}.{name} has no docstring"


def test_public_modules_export_no_private_module():
  for module, namespace in PUBLIC.items():
    for name in namespace.__all__:
      assert not name.startswith("_"), (module, name)


def _user_facing_sources():
  patterns = ["README.md", "docs/**/*.md", "examples/**/*.py"]
  return sorted({path for pattern in patterns for path in ROOT.glob(pattern) if path.is_file()})


def test_readme_docs_and_examples_use_public_names_only():
  reference = re.compile(r"\btrquant\.(?:(nnx|adaround|export)\.)?([A-Za-z_]\w*)\b(?!\.py)")
  bad = []
  for path in _user_facing_sources():
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      if "trquant._src" in line or "from trquant import _src" in line:
        bad.append(f"{path.relative_to(ROOT)}:{number}: imports trquant._src")
      for match in reference.finditer(line):
        module, name = match.group(1) or "", match.group(2)
        if not module and (name in SUBMODULES or name in ("md", "__version__")):
          continue
        if name not in PUBLIC[module].__all__:
          bad.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)}")
  assert not bad, "private or unknown names:\n" + "\n".join(bad[:30])


def _public_callables():
  """``(qualified name, function)`` of every public function and class constructor.

  Skipped: submodules, NamedTuples and exception / warning classes (their constructors are
  generated or inherited), and classes whose constructor is not trquant's (the
  ``nnx.Variable`` subclasses take flax's).
  """
  for module, namespace in PUBLIC.items():
    for name in namespace.__all__:
      value = getattr(namespace, name)
      qualified = f"trquant.{module + '.' if module else ''}{name}"
      if inspect.ismodule(value):
        continue
      if inspect.isclass(value):
        if issubclass(value, (BaseException, tuple)):
          continue
        init = value.__init__
        if not getattr(init, "__module__", "").startswith("trquant"):
          continue
        yield f"{qualified}.__init__", init
      elif callable(value):
        yield qualified, inspect.unwrap(value)


def test_public_callables_are_annotated():
  """Every parameter of a public callable is annotated (``*args``/``**kwargs`` too, e.g.
  ``Any``), and every public function has a return annotation."""
  callables = dict(_public_callables())
  assert "trquant.fake_quant" in callables and "trquant.nnx.QuantLinear.__init__" in callables
  missing = []
  for qualified, fn in callables.items():
    signature = inspect.signature(fn)
    for i, parameter in enumerate(signature.parameters.values()):
      if i == 0 and parameter.name in ("self", "cls"):
        continue
      if parameter.annotation is inspect.Parameter.empty:
        missing.append(f"{qualified}: parameter {parameter.name!r}")
    if (signature.return_annotation is inspect.Signature.empty
        and not qualified.endswith(".__init__")):
      missing.append(f"{qualified}: return")
  assert not missing, "unannotated:\n" + "\n".join(missing)
