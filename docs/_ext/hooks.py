"""MkDocs hooks: the benchmark results become pages of the site.

``benchmarks/RESULTS.md`` (and the figures it shows) is not under ``docs/``; it is added
to the site at its repository path. The documentation links to it as a file of the
repository, relative to the page (``../benchmarks/RESULTS.md`` from ``docs/index.md``),
so the links work on a repository browser too; here such links are pointed at the page
the site holds instead.
"""

import os
import posixpath
import re

from mkdocs.structure.files import File

# Repository files that become pages of the site, at their repository path.
MOUNTED = ("benchmarks/RESULTS.md",)

_LINK = re.compile(r"\]\((?P<url>[^)\s#]+)(?P<fragment>#[^)\s]*)?\)")


def _repo_root(config):
  return os.path.dirname(os.path.abspath(config["config_file_path"]))


def _docs_prefix(config):
  """The docs directory relative to the repository root (``docs``)."""
  return os.path.relpath(config["docs_dir"], _repo_root(config)).replace(os.sep, "/")


def on_files(files, config):
  """Adds the mounted files and the images they link to."""
  root = _repo_root(config)
  for path in MOUNTED:
    files.append(File.generated(config, path, abs_src_path=os.path.join(root, path)))
    with open(os.path.join(root, path), encoding="utf-8") as f:
      text = f.read()
    for match in _LINK.finditer(text):
      url = match.group("url")
      if "://" in url or not url.endswith((".png", ".svg", ".jpg")):
        continue
      target = posixpath.normpath(posixpath.join(posixpath.dirname(path), url))
      if os.path.isfile(os.path.join(root, target)) and files.get_file_from_path(target) is None:
        files.append(File.generated(config, target, abs_src_path=os.path.join(root, target)))
  return files


def on_page_markdown(markdown, page, config, files):
  """Points a docs page's links to mounted repository files at their pages on the site."""
  if page.file.src_uri in MOUNTED:
    return markdown
  page_dir = posixpath.dirname(page.file.src_uri)
  repo_dir = posixpath.join(_docs_prefix(config), page_dir)

  def rewrite(match):
    url = match.group("url")
    if "://" in url or url.startswith(("/", "mailto:")):
      return match.group(0)
    target = posixpath.normpath(posixpath.join(repo_dir, url))
    if target not in MOUNTED:
      return match.group(0)
    new = posixpath.relpath(target, page_dir or ".")
    return f"]({new}{match.group('fragment') or ''})"

  return _LINK.sub(rewrite, markdown)
