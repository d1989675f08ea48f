"""Every ```python block of README.md and docs/*.md runs as written, and every relative link of those pages resolves.

A block runs in a fresh interpreter in an empty folder, with one substitution: the Hub id of the default model
(``HuggingFaceTB/SmolLM2-135M-Instruct``, not downloadable here) becomes a folder holding a tiny random Llama. A block
that needs files it cannot make itself (a checkpoint of the authors' code, a quantized GPU model) is preceded by
``<!-- readme-test: covered by tests/FILE.py -->``: then the block's lines must appear, in order and verbatim (up to
indentation), in that test file, which runs them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MARK = re.compile(r"<!--\s*readme-test:\s*covered by (tests/[\w/]+\.py)\s*-->")


PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]


def readme_blocks() -> list[tuple[str, str, str | None]]:
    """(id, code, covering test file or None) of every python block of every page."""
    blocks = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
            before = text[: match.start()].rstrip().splitlines()
            mark = MARK.search(before[-1]) if before else None
            line = text[: match.start()].count("\n") + 1
            heading = next((h for h in reversed(before) if h.startswith("#")), "#").lstrip("# ").strip()
            name = page.relative_to(REPO).as_posix()
            blocks.append((f"{name}:L{line}-{heading[:30]}", match.group(1), mark.group(1) if mark else None))
    return blocks


BLOCKS = readme_blocks()


def test_readme_has_python_blocks():
    assert len([b for b in BLOCKS if b[0].startswith("README.md:")]) >= 1, [b[0] for b in BLOCKS]
    assert len(BLOCKS) >= 5, [b[0] for b in BLOCKS]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def relative_links() -> list[tuple[str, str]]:
    """(page, target) of every markdown link or image that is not an absolute URL."""
    links = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # not inside code blocks
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                links.append((page.relative_to(REPO).as_posix(), target))
    return links


def test_docs_exist_and_are_linked_from_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"docs/{page.name} is not in the README's documentation map"


@pytest.mark.parametrize("page, target", relative_links())
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    source = REPO / page
    file = (source.parent / path).resolve() if path else source
    assert file.exists(), f"{page}: link target {target!r} does not exist ({file})"
    if anchor and file.suffix == ".md":
        headings = [ln.lstrip("#") for ln in file.read_text(encoding="utf-8").splitlines() if ln.startswith("#")]
        anchors = {_anchor(h) for h in headings}
        assert anchor in anchors, f"{page}: anchor #{anchor} not among the headings of {file.name}: {sorted(anchors)}"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from conftest import make_tiny_llama

    folder = tmp_path_factory.mktemp("readme-model")
    make_tiny_llama().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("block_id, code, covered_by", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_readme_block_runs_as_written(block_id, code, covered_by, tiny_model_dir, tmp_path):
    if covered_by:
        test_lines = [ln.strip() for ln in (REPO / covered_by).read_text(encoding="utf-8").splitlines()]
        block_lines = [ln.strip() for ln in code.strip().splitlines()]
        n = len(block_lines)
        found = any(test_lines[i : i + n] == block_lines for i in range(len(test_lines) - n + 1))
        assert found, f"README block {block_id} is not verbatim in {covered_by}, which is said to run it"
        return
    script = code.replace(HUB_ID, str(tiny_model_dir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)  # fmt: skip
    assert proc.returncode == 0, f"README block {block_id} failed:\n{proc.stderr[-3000:]}"
