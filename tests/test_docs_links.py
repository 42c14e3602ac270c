"""The documentation's links: every relative link in README.md, docs/*.md and tests/README.md
points to a file that exists, every ``#anchor`` in such a link matches a heading of its target
(GitHub's slugs), and the README stays a front door (at most 250 lines).  No MPI, no Cellpose."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def doc_files():
    files = [ROOT / "README.md", ROOT / "tests" / "README.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    return [f for f in files if f.exists()]


def prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def slug(heading):
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation other than '-'
    and '_' removed, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text)                           # inline HTML
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path):
    """Every heading's anchor in a markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen, out = {}, set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def links(path):
    """(line number, target) of every link in the prose of a markdown file (code spans skipped)."""
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        bare = CODE_SPAN.sub("", line)
        for m in INLINE_LINK.finditer(bare):
            yield n, m.group(1)
        m = REFERENCE_DEF.match(bare)
        if m:
            yield n, m.group(1)


def test_slug_follows_github():
    assert slug("The network once per voxel: `--pipeline flows`") == "the-network-once-per-voxel---pipeline-flows"
    assert slug("Two channels (cytoplasm + nucleus)") == "two-channels-cytoplasm--nucleus"
    assert slug("Coming from `cellpose.contrib.distributed_segmentation`") == \
        "coming-from-cellposecontribdistributed_segmentation"
    assert slug("On a cluster: use the cluster's MPI") == "on-a-cluster-use-the-clusters-mpi"


def test_link_parser_skips_code():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.md"
        p.write_text("see [a](a.md#b) and `[no](c.md)`\n```\n[no](d.md)\n```\n[ref]: e.md\n")
        assert [t for _, t in links(p)] == ["a.md#b", "e.md"]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    problems = []
    for n, target in links(path):
        if EXTERNAL.match(target) or target.startswith("//"):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{n}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file {dest}")
            continue
        if anchor and dest.is_file() and dest.suffix.lower() == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES} (move detail to docs/)"
