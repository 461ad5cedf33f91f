"""The public API: ``trquant``, ``trquant.nnx``, ``trquant.adaround`` and ``trquant.export``.

Every name in an ``__all__`` exists; the README, the docs and the examples use public
names only (``trquant.<module>.<name>`` with ``<name>`` in that module's ``__all__``) and
never import ``trquant._src``.
"""

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
