"""The documentation's promises that a test can hold: the two commands at the top of the README (the second is exactly
what CI runs); every Python snippet in the README and in `docs/*.md` is valid Python that imports only names that
exist; every docs page is reachable from the README; every relative link points at a file (and heading) that exists."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_PATH = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README_PATH, *sorted(DOCS.glob("*.md"))]
FENCED = re.compile(r"```(\w*)\n(.*?)```", flags=re.S)

README = README_PATH.read_text()
BLOCKS = FENCED.findall(README)
PYTHON = [
    (page, i, code)
    for page in PAGES
    for i, code in enumerate(code for lang, code in FENCED.findall(page.read_text()) if lang == "python")
]

# Python snippets in README + docs when the README was split into topic pages; a page may gain snippets, but a move
# that drops them (or a fence that stops being recognised) fails here.
MIN_PYTHON_SNIPPETS = 20


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _prose(text: str) -> str:
    """The text outside fenced blocks and inline code spans, where markdown links and headings live."""
    return re.sub(r"`[^`\n]*`", "", FENCED.sub("", text))


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped (`_` and `-` kept), spaces to `-`, `-N` on repeats."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", FENCED.sub("", page.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def _relative_links(page: Path) -> list[tuple[str, Path, str]]:
    """(link as written, target file, anchor) for every link of `page` that is not a URL."""
    links = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        links.append((target, (page.parent / path).resolve() if path else page, anchor))
    return links


def test_the_first_two_blocks_are_the_main_job_and_the_tests() -> None:
    (lang1, main_job), (lang2, tests) = BLOCKS[:2]
    assert lang1 == lang2 == "bash"
    assert main_job.strip().startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
    assert '"torch==2.13.0"' in main_job and ".[plot]" in main_job and main_job.strip().endswith("bd3lm demo")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert ci == [tests.strip()]


@pytest.mark.parametrize(
    "page,code", [(p, c) for p, _, c in PYTHON], ids=[f"{_name(p)}:block{i}" for p, i, _ in PYTHON]
)
def test_python_snippets_parse_and_import_real_names(page: Path, code: str) -> None:
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] in ("modeling_bd3lm", "bd3lm_trainer", "bd3lm_configuration", "hub_upload")
        ):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), (
                    f"{_name(page)} imports {alias.name} from {node.module}, which lacks it"
                )


def test_there_are_snippets_to_check() -> None:
    assert len(PYTHON) >= MIN_PYTHON_SNIPPETS
    assert any(page == README_PATH for page, _, _ in PYTHON), "the README lost its Python quickstart"


def test_every_docs_page_is_linked_from_the_readme_and_the_index() -> None:
    pages = set(DOCS.glob("*.md"))
    assert DOCS / "index.md" in pages
    from_readme = {target for _, target, _ in _relative_links(README_PATH)}
    from_index = {target for _, target, _ in _relative_links(DOCS / "index.md")}
    assert sorted(_name(p) for p in pages - from_readme) == [], "docs pages the README does not link to"
    assert sorted(_name(p) for p in pages - from_index - {DOCS / "index.md"}) == [], "pages missing from docs/index.md"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for written, target, anchor in _relative_links(page):
        if not target.exists():
            broken.append(f"{written}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{written}: no heading with anchor #{anchor} in {_name(target)}")
    assert broken == [], f"broken links in {_name(page)}"
