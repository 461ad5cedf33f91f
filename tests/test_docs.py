"""Every ```python block of the README and of the documentation (docs/) executes.

The blocks of one page run in order in one namespace, so a page can build on its earlier
blocks, in a temporary working directory (files a block writes land there). A failure
names the page and the line where the failing block starts, and the traceback's line
numbers are the page's.
"""

import pathlib
import re
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A fenced ```python block (with or without attributes after the language), at any
# indentation (inside a list item too), up to its closing fence.
_BLOCK = re.compile(r"^(?P<indent>[ \t]*)```python(?:[ \t][^\n]*)?\n(?P<body>.*?)"
                    r"^(?P=indent)```[ \t]*$", re.M | re.S)


def python_blocks(text):
  """``(line, source)`` of every ```python block of a Markdown text, in order.

  ``line`` is the 1-based line of the block's first line of code.
  """
  return [(text.count("\n", 0, m.start("body")) + 1, textwrap.dedent(m.group("body")))
          for m in _BLOCK.finditer(text)]


def pages():
  """The README and every Markdown page under docs/ that holds a ```python block."""
  paths = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
  return [p.relative_to(ROOT).as_posix() for p in paths if python_blocks(p.read_text())]


def run_page(page):
  """Executes the page's ```python blocks in order in one namespace; returns it."""
  namespace = {"__name__": "__docs__"}
  for line, source in python_blocks((ROOT / page).read_text()):
    code = compile("\n" * (line - 1) + source, str(ROOT / page), "exec")
    try:
      exec(code, namespace)
    except Exception as e:
      raise AssertionError(f"{page}: the ```python block at line {line} raised "
                           f"{type(e).__name__}: {e}") from e
  return namespace


def test_python_blocks_are_found():
  """The block parser finds indented blocks and reports the line of their first code line."""
  text = ("# t\n\n```python\na = 1\n```\n\n* item\n\n  ```python\n  b = a + 1\n  ```\n"
          "```bash\nls\n```\n```python title=\"c.py\"\nc = 3\n```\n")
  assert python_blocks(text) == [(4, "a = 1\n"), (10, "b = a + 1\n"), (16, "c = 3\n")]
  assert "README.md" in pages()


def test_a_failing_block_names_its_page_and_line(tmp_path):
  """A failure names the page and the block's first line; blocks share one namespace."""
  page = tmp_path / "page.md"
  page.write_text("```python\nx = 1\n```\n\ntext\n\n```python\ny = x + 1\nz = undefined\n```\n")
  with pytest.raises(AssertionError, match=r"page.md: the ```python block at line 8 raised "
                                           r"NameError") as raised:
    run_page(str(page))
  assert raised.value.__cause__.__traceback__.tb_next.tb_lineno == 9  # the page's own line


@pytest.mark.parametrize("page", pages())
def test_page_code_blocks_run(page, tmp_path, monkeypatch):
  """The page's ```python blocks run, in order, in one namespace."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  namespace = run_page(page)
  check = _CHECKS.get(page)
  if check is not None:
    check(namespace)


def _check_readme(namespace):
  """The README's TR-scheduling quickstart trains: its loss falls over the 50 steps."""
  assert namespace["losses"][-1] < namespace["losses"][0]


_CHECKS = {"README.md": _check_readme}
