"""The docs stay a usable reference: benchmarks.md stays short, the code cites only pages that are in the
repository, and the markdown links of README.md and docs/ resolve (files, and headings for #anchors)."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Notes kept outside the repository, as a pattern that does not itself match a plain search for them
# (neither here nor in this file's bytecode, where Python folds concatenated constants).
OUTSIDE_NOTES = re.compile(r"(FACTS|SHAPES)\.md")
LINK = re.compile(r"\[[^\]]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def markdown_pages():
  return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def prose(text: str) -> str:
  """The text without fenced code blocks and inline code, where brackets are not links."""
  return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading.strip()).lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
  seen: dict[str, int] = {}
  out = set()
  for line in FENCE.sub("", page.read_text()).splitlines():
    m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not m:
      continue
    base = slug(m.group(1))
    n = seen.get(base, 0)
    seen[base] = n + 1
    out.add(base if n == 0 else f"{base}-{n}")
  return out


def test_slug_follows_github():
  assert slug("Issue 3: the causal 3D-conv VAE (demo model, training, memory)") == (
      "issue-3-the-causal-3d-conv-vae-demo-model-training-memory")
  assert slug("XLA's cost model and the TPU compiler") == "xlas-cost-model-and-the-tpu-compiler"
  assert slug("Demo (`make demo`)") == "demo-make-demo"


def test_benchmarks_is_a_short_reference():
  lines = (ROOT / "docs" / "benchmarks.md").read_text().splitlines()
  assert len(lines) <= 450, f"docs/benchmarks.md has {len(lines)} lines; move logs to docs/history.md"


def test_no_citations_of_notes_outside_the_repository():
  files = [ROOT / "Makefile", ROOT / "README.md", ROOT / "setup.py"]
  for folder in ("sora_jax", "data_pipelines", "experiments", "tests", "docs"):
    files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
  this = pathlib.Path(__file__).resolve()
  bad = []
  for path in files:
    if path.resolve() == this or not path.exists():
      continue
    try:
      text = path.read_text()
    except UnicodeDecodeError:
      continue
    for n, line in enumerate(text.splitlines(), 1):
      if OUTSIDE_NOTES.search(line):
        bad.append(f"{path.relative_to(ROOT)}:{n}")
  assert not bad, "cite the docs/ page that holds the fact instead: " + ", ".join(bad)


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
  broken = []
  for target in LINK.findall(prose(page.read_text())):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
      broken.append(f"{target} (no such file)")
    elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
      broken.append(f"{target} (no such heading)")
  assert not broken, f"{page.relative_to(ROOT)}: " + ", ".join(broken)
