"""The README and docs/ as a reader follows them: every relative link and image path resolves to a
file of the repository, and the README stays a first visit's length. (The README's research
example runs as written in test_library.py.)"""

import pathlib
import re
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README_MAX_LINES = 300

# [text](target) and ![alt](target), with an optional <...> around the target and a title after.
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.M)  # [label]: target
_HTML_SRC = re.compile(r"<img\b[^>]*?\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.I)
# Code is not rendered as links: fenced blocks and inline spans.
_CODE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1|`[^`\n]*`", re.M | re.S)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def markdown_files(root: pathlib.Path) -> list[pathlib.Path]:
  return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def link_targets(text: str) -> list[str]:
  """Every link, image and <img> target of a Markdown text, in order, outside code."""
  text = _CODE.sub("CODE", text)  # a placeholder: a line that began with code is not a [label]:
  found = [(m.start(), m.group(1)) for pattern in (_INLINE, _REFERENCE, _HTML_SRC)
           for m in pattern.finditer(text)]
  return [target for _, target in sorted(found)]


def broken_links(path: pathlib.Path, root: pathlib.Path) -> list[str]:
  """The relative targets in `path` that name no file or folder inside `root` (web addresses
  and anchors within the page are not checked; a target's #fragment is ignored)."""
  broken = []
  for target in link_targets(path.read_text()):
    if not target or target.startswith("#") or _SCHEME.match(target):
      continue
    local = urllib.parse.unquote(target.split("#", 1)[0])
    resolved = (path.parent / local).resolve()
    if not resolved.exists() or not resolved.is_relative_to(root.resolve()):
      broken.append(target)
  return broken


def test_the_checker_reports_broken_links_and_images(tmp_path):
  root = tmp_path / "repo"
  (root / "docs").mkdir(parents=True)
  (root / "docs" / "fig.png").write_bytes(b"")
  (tmp_path / "outside.md").write_text("")
  (root / "README.md").write_text(
      "[ok](docs/fig.png) [gone](docs/missing.md#part) ![img](docs/nope.png)\n"
      '<img width="10" src="docs/none.png"> [titled](docs/fig.png "a figure") [web](https://x.org)\n'
      "[here](#top) [mail](mailto:a@b.c) `[code](not/checked.md)`\n"
      "```\n[fenced](not/checked.md)\n```\n"
      "[ref]: docs/also_missing.md\n")
  (root / "docs" / "a.md").write_text("![fig](fig.png) [up](../README.md#quickstart) "
                                      "[out](../../outside.md)\n")
  assert broken_links(root / "README.md", root) == [
      "docs/missing.md#part", "docs/nope.png", "docs/none.png", "docs/also_missing.md"]
  assert broken_links(root / "docs" / "a.md", root) == ["../../outside.md"]


@pytest.mark.parametrize("path", markdown_files(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(path):
  assert broken_links(path, ROOT) == []


def test_readme_is_a_first_visits_length():
  lines = len((ROOT / "README.md").read_text().splitlines())
  assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail into docs/"
