"""A griffe extension: the reStructuredText bits of trquant's docstrings, as Markdown.

The docstrings are Google style, with a few Sphinx habits: roles (``:func:`name```,
``:class:`~trquant.nnx.QuantRule```) and literal blocks introduced by ``::``. Roles
become code spans (``name``, or the last component after ``~``), and a ``::`` block
becomes a fenced code block. An ``Example:`` section is read as ``Examples:`` (the
Google-style title griffe knows), so that its doctests render as code. An ``Args:`` entry
that documents several parameters whose names run over more than one line
(``in_features, out_features, ...,`` then ``rngs: as nnx.Linear``) has its names joined
into one line, where the Google-style parser looks for ``names: description``.
"""

import re
import textwrap

import griffe

_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.M)
_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|attr|meth|data|obj|exc|const):`(?P<tilde>~?)(?P<name>[^`]+)`")


def _role(match):
  name = match.group("name")
  if match.group("tilde"):
    name = name.rsplit(".", 1)[-1]
  return f"`{name}`"


def _indent(line):
  return len(line) - len(line.lstrip())


def _literal_blocks(text):
  """Turns reST literal blocks (a paragraph ending in ``::``, then an indented block) into
  fenced code blocks."""
  lines = text.split("\n")
  out, i = [], 0
  while i < len(lines):
    line = lines[i]
    stripped = line.rstrip()
    if not stripped.endswith("::") or stripped.lstrip().startswith(">>>"):
      out.append(line)
      i += 1
      continue
    base = _indent(line)
    head = stripped[:-2].rstrip()
    j = i + 1
    while j < len(lines) and not lines[j].strip():
      j += 1
    block_start = j
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
      j += 1
    block = lines[block_start:j]
    while block and not block[-1].strip():
      block.pop()
    if not block:
      out.append(line)
      i += 1
      continue
    if head.strip():
      out.append(head + ":")
    pad = " " * base
    out.append("")
    out.append(pad + "```")
    out.extend(pad + l for l in textwrap.dedent("\n".join(block)).split("\n"))
    out.append(pad + "```")
    out.append("")
    i = j
  return "\n".join(out)


def _joined_arg_names(text):
  """Joins the lines of an ``Args:`` entry's name list (lines ending in a comma, with no
  colon) with the line that ends it."""
  lines = text.split("\n")
  out, section, entry = [], None, None
  for line in lines:
    if line.strip() and section is not None and _indent(line) <= section:
      section = entry = None
    if re.fullmatch(r"\s*Args:\s*", line):
      section, entry = _indent(line), None
      out.append(line)
      continue
    if section is not None and line.strip():
      if entry is None:
        entry = _indent(line)
      if (_indent(line) > entry and out and out[-1].rstrip().endswith(",")
          and ":" not in out[-1] and _indent(out[-1]) == entry):
        out[-1] = out[-1].rstrip() + " " + line.strip()
        continue
    out.append(line)
  return "\n".join(out)


class SphinxRoles(griffe.Extension):
  """Rewrites each docstring once, when its object is loaded."""

  def on_object(self, *, obj, **kwargs):
    docstring = obj.docstring
    if docstring is None or obj.is_alias:
      return
    text = _literal_blocks(_joined_arg_names(_ROLE.sub(_role, docstring.value)))
    docstring.value = _EXAMPLE.sub(r"\g<indent>Examples:", text)
