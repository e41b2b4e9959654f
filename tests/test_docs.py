"""The documents the code cites are in docs/, and every citation of them resolves.

The code cites the runbook by section ("runbook §2.3", "(§7)", "§2 step 7") and the design notes
by path (docs/design.md). These tests read the repository as text — no import of the product,
no server — and hold every citation to an anchor of docs/runbook.md, every sub-section of the
runbook to a citation, every cited docs/ file to the file, and what the documents name (modules,
their functions, the failure signatures) to the code. Each checker is first run on a small
example with a made-up citation: a checker that finds nothing cannot pass for complete documents.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = "docs/runbook.md"
DIAGNOSE = "tasks/steps/diagnose.py"
# Where the code cites the documents: every text file under these, and these files.
SOURCES = (
    "flows",
    "tasks",
    "deployments",
    "local_stack",
    "bench",
    "examples",
    "tests",
    "README.md",
    "prefect.yaml",
    "Makefile",
    "Dockerfile",
    "pyproject.toml",
)
SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", ".mypy_cache", ".pytest_cache"})
THIS_FILE = Path(__file__).resolve()  # its examples cite made-up sections on purpose

# "§2.3" → s2-3, "§7" → s7; "§2 step 7" and "§2, step 7" → s2-7 (the runbook numbers the steps
# of its §2 workflow 1–8, which the documents call §2.1–§2.8).
CITATION = re.compile(r"§ ?(\d+)(?:\.(\d+)|,? step (\d+))?")
ANCHOR = re.compile(r'<a id="([\w-]+)"></a>')
SECTION_ANCHOR = re.compile(r"s(\d+)(?:-(\d+))?")
SECTION_HEADING = re.compile(r"#{2,6} §(\d+)(?:\.(\d+))? \S")
DOC_CITATION = re.compile(r"(?<![\w./-])(docs/[\w./-]+\.md)(?:#([\w-]+))?")
# "owner/repo docs/x.md" names another repository's file (bench/latency_model.py's sources).
OTHER_REPOSITORY = re.compile(r"(?<![\w./-])[\w.-]+/[\w.-]+\s+$")
# A Markdown link to a file of the repository or an anchor: no scheme, so no URL matches.
LINK = re.compile(r"\]\(([\w./-]*?)(?:#([\w-]+))?\)")
# A path of the repository in a code span, and the name that may follow it: `tasks/x.py` `name`.
CODE_PATH = re.compile(
    r"`((?:flows|tasks|deployments|local_stack|examples|tests|bench)/[\w./-]*)`"
    r"(?: `([A-Za-z_]\w*)`)?"
)
SIGNATURE_KEY = re.compile(r'_sig\(\s*"([a-z0-9-]+)"')
NAMED_KEY = re.compile(r"\bkeys? `([a-z0-9-]+)`")

# A file of the repository: its text, "" for a directory, None when there is no such path.
Repository = Callable[[str], str | None]


def anchor_of(major: str, minor: str | None = None) -> str:
    return f"s{major}" if not minor else f"s{major}-{minor}"


def label_of(anchor: str) -> str:
    match = SECTION_ANCHOR.fullmatch(anchor)
    assert match is not None, anchor
    return f"§{match[1]}" + (f".{match[2]}" if match[2] else "")


def cited_sections(text: str) -> list[str]:
    """The runbook anchors ``text`` cites, in order."""
    return [anchor_of(match[1], match[2] or match[3]) for match in CITATION.finditer(text)]


def cited_docs(line: str) -> list[tuple[str, str | None]]:
    """The ``docs/….md`` files (and anchors) one line cites; another repository's are not ours."""
    return [
        (match[1], match[2])
        for match in DOC_CITATION.finditer(line)
        if not OTHER_REPOSITORY.search(line[: match.start()])
    ]


def explicit_anchors(markdown: str) -> set[str]:
    return set(ANCHOR.findall(markdown))


def section_anchors(markdown: str) -> tuple[set[str], list[str]]:
    """The § anchors of the runbook, and what is wrong with how they stand: each must be
    unique and on the line right before the heading of its section."""
    lines = markdown.splitlines()
    anchors: set[str] = set()
    problems: list[str] = []
    for index, line in enumerate(lines):
        match = ANCHOR.fullmatch(line.strip())
        if match is None or not SECTION_ANCHOR.fullmatch(match[1]):
            continue
        anchor = match[1]
        if anchor in anchors:
            problems.append(f"{RUNBOOK}:{index + 1}: anchor {anchor} appears twice")
        anchors.add(anchor)
        following = lines[index + 1] if index + 1 < len(lines) else ""
        heading = SECTION_HEADING.match(following)
        if heading is None or anchor_of(heading[1], heading[2]) != anchor:
            problems.append(
                f'{RUNBOOK}:{index + 1}: <a id="{anchor}"></a> must stand right before its'
                f" heading, '## {label_of(anchor)} …' (found {following!r})"
            )
    return anchors, problems


def citation_problems(sources: Mapping[str, str], docs: Mapping[str, str]) -> list[str]:
    """What does not resolve: ``sources`` (path → text) cite the runbook and the docs files in
    ``docs`` (path → text); a runbook sub-section nobody cites is an orphan."""
    if RUNBOOK not in docs:
        return [f"{RUNBOOK} is missing: the code cites the runbook by section"]
    anchors, problems = section_anchors(docs[RUNBOOK])
    cited: dict[str, list[str]] = {}
    for where, text in sorted(sources.items()):
        for number, line in enumerate(text.splitlines(), start=1):
            for anchor in cited_sections(line):
                cited.setdefault(anchor, []).append(f"{where}:{number}")
            for path, fragment in cited_docs(line):
                if path not in docs:
                    problems.append(f"{where}:{number} cites {path}, which does not exist")
                elif fragment and fragment not in explicit_anchors(docs[path]):
                    problems.append(f"{where}:{number} cites {path}#{fragment}: no such anchor")
    for anchor, places in sorted(cited.items()):
        if anchor not in anchors:
            problems.append(
                f"{places[0]} cites runbook {label_of(anchor)}, but {RUNBOOK} has no section"
                f" for it (anchor {anchor}; cited {len(places)}×): add the section or fix the"
                " citation"
            )
    for anchor in sorted(anchors - cited.keys()):
        if "-" in anchor:
            problems.append(
                f"{RUNBOOK}#{anchor} ({label_of(anchor)}) is cited nowhere: an orphan"
                " sub-section — cite it where that step is done, or fold it into its §"
            )
    return problems


def reference_problems(docs: Mapping[str, str], repository: Repository) -> list[str]:
    """What the documents point at that is not there: a link to a missing file or anchor, a
    module path in a code span that does not exist, a name the module does not hold."""
    problems: list[str] = []
    for where, text in sorted(docs.items()):
        for number, line in enumerate(text.splitlines(), start=1):
            for target, fragment in LINK.findall(line):
                path = posixpath.normpath(posixpath.join(posixpath.dirname(where), target))
                if not target:
                    path = where
                if path in docs:
                    if fragment and fragment not in explicit_anchors(docs[path]):
                        problems.append(f"{where}:{number} links to {path}#{fragment}: no anchor")
                elif repository(path) is None:
                    problems.append(f"{where}:{number} links to {target}, which does not exist")
            for path, name in CODE_PATH.findall(line):
                found = repository(path.rstrip("/"))
                if found is None:
                    problems.append(f"{where}:{number} names {path}, which does not exist")
                elif name and not re.search(rf"\b{re.escape(name)}\b", found):
                    problems.append(f"{where}:{number} names {name} in {path}, which has none")
    return problems


def signature_problems(runbook: str, diagnose_source: str) -> list[str]:
    """The failure table of the runbook names every diagnosis key of ``tasks/steps/diagnose.py``
    ``SIGNATURES``, and no key that is not there."""
    keys = SIGNATURE_KEY.findall(diagnose_source)
    problems = [] if keys else [f"no signature keys found in {DIAGNOSE}"]
    problems += [
        f"{RUNBOOK} does not name the diagnosis key `{key}` of {DIAGNOSE}: add it to §7"
        for key in keys
        if f"`{key}`" not in runbook
    ]
    problems += [
        f"{RUNBOOK} names the diagnosis key `{key}`, which {DIAGNOSE} SIGNATURES does not hold"
        for key in sorted(set(NAMED_KEY.findall(runbook)) - set(keys))
    ]
    return problems


# --- the repository as text -----------------------------------------------------------------


def _text_files(root: Path, names: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    for name in names:
        top = root / name
        paths = sorted(top.rglob("*")) if top.is_dir() else [top]
        for path in paths:
            if not path.is_file() or path.resolve() == THIS_FILE:
                continue
            if SKIPPED_DIRS.intersection(path.relative_to(root).parts):
                continue
            data = path.read_bytes()
            if b"\0" in data:
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            yield path.relative_to(root).as_posix(), text


def _sources() -> dict[str, str]:
    return dict(_text_files(ROOT, SOURCES))


def _docs() -> dict[str, str]:
    return {
        path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted((ROOT / "docs").glob("*.md"))
    }


def _repository(path: str) -> str | None:
    target = ROOT / path
    if target.is_dir():
        return ""
    if target.is_file():
        return target.read_text(encoding="utf-8", errors="replace")
    return None


# --- the checkers, on small examples ----------------------------------------------------------

EXAMPLE_RUNBOOK = """# The runbook

<a id="s2"></a>
## §2 The workflow

<a id="s2-3"></a>
### §2.3 Preflight

<a id="s2-7"></a>
### §2.7 The comment

<a id="s7"></a>
## §7 The failure table

Key `docker-missing`, and [the workflow](#s2), [the notes](design.md).

<a id="s11"></a>
## §11 Later
"""
EXAMPLE_DOCS = {RUNBOOK: EXAMPLE_RUNBOOK, "docs/design.md": "# Design\n"}
EXAMPLE_SOURCES = {
    "tasks/steps/preflight.py": '"""Preflight (runbook §2.3); see docs/design.md."""\n',
    "tasks/github/pull_request.py": "# The comment (runbook §2 step 7), diagnosed as in §7.\n",
    "bench/model.py": '"brevdev/ec2-coldboot-research docs/cold-baseline-results.md"\n',
}


@pytest.mark.parametrize(
    ("text", "anchors"),
    [
        ("runbook §2.3", ["s2-3"]),
        ("(§7)", ["s7"]),
        ("§7's table", ["s7"]),
        ("(runbook §9).", ["s9"]),
        ("§ 5", ["s5"]),
        ("§0, §6, §8, §9", ["s0", "s6", "s8", "s9"]),
        ("runbook §2 step 7", ["s2-7"]),
        ("(§2, step 1)", ["s2-1"]),
        ("§11).", ["s11"]),
        ("one section per §", []),
    ],
)
def test_a_citation_resolves_to_its_anchor(text: str, anchors: list[str]) -> None:
    assert cited_sections(text) == anchors


def test_complete_examples_have_no_problems() -> None:
    assert citation_problems(EXAMPLE_SOURCES, EXAMPLE_DOCS) == []
    assert reference_problems(EXAMPLE_DOCS, lambda path: None) == []


def test_a_made_up_citation_is_a_problem() -> None:
    sources = {
        **EXAMPLE_SOURCES,
        "tasks/steps/launch.py": "x = 1\n# Launch (runbook §12.4, §2.3)\n",
    }
    problems = citation_problems(sources, EXAMPLE_DOCS)
    assert len(problems) == 1, problems
    assert problems[0].startswith("tasks/steps/launch.py:2 cites runbook §12.4")
    assert "anchor s12-4" in problems[0]


def test_an_orphan_sub_section_is_a_problem_and_an_uncited_top_level_one_is_not() -> None:
    orphan = '<a id="s6"></a>\n## §6 Tunnels\n\n<a id="s6-9"></a>\n### §6.9 Nobody cites this\n'
    runbook = EXAMPLE_RUNBOOK + "\n" + orphan
    problems = citation_problems(EXAMPLE_SOURCES, {**EXAMPLE_DOCS, RUNBOOK: runbook})
    assert problems == [
        f"{RUNBOOK}#s6-9 (§6.9) is cited nowhere: an orphan sub-section — cite it where that"
        " step is done, or fold it into its §"
    ]


@pytest.mark.parametrize(
    "broken",
    [
        '<a id="s3"></a>\n\n## §3 A blank line between',
        '<a id="s3"></a>\n## §4 Another section',
        '<a id="s3"></a>\nNo heading at all',
        '<a id="s7"></a>\n## §7 Twice',
    ],
)
def test_an_anchor_away_from_its_heading_is_a_problem(broken: str) -> None:
    runbook = EXAMPLE_RUNBOOK + "\n" + broken + "\n"
    problems = citation_problems(EXAMPLE_SOURCES, {**EXAMPLE_DOCS, RUNBOOK: runbook})
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{RUNBOOK}:")


def test_a_cited_document_or_anchor_that_does_not_exist_is_a_problem() -> None:
    sources = {
        **EXAMPLE_SOURCES,
        "flows/a.py": "# see docs/designs.md\n# the sweep (docs/runbook.md#s9)\n",
        "flows/b.py": "# the failures (docs/runbook.md#s7)\n",
    }
    assert citation_problems(sources, EXAMPLE_DOCS) == [
        "flows/a.py:1 cites docs/designs.md, which does not exist",
        "flows/a.py:2 cites docs/runbook.md#s9: no such anchor",
    ]
    assert citation_problems(sources, {"docs/design.md": ""}) == [
        f"{RUNBOOK} is missing: the code cites the runbook by section"
    ]


def test_a_reference_the_code_does_not_hold_is_a_problem() -> None:
    files = {"tasks/cloud/tunnel.py": "def tunnel_argv(): ...\n", "deployments/iam": ""}
    docs = {
        RUNBOOK: "[§9](#s9) and [notes](design.md#tenancy) and [it](../README.md)\n"
        "`tasks/cloud/tunnel.py` `tunnel_argv`, `deployments/iam/`,"
        " `tasks/cloud/tunnel.py` `tunnel_cmd`,"
        " `tasks/tunnels.py`\n",
        "docs/design.md": '<a id="tenancy"></a>\n## Tenancy\n',
    }
    assert reference_problems(docs, files.get) == [
        f"{RUNBOOK}:1 links to {RUNBOOK}#s9: no anchor",
        f"{RUNBOOK}:1 links to ../README.md, which does not exist",
        f"{RUNBOOK}:2 names tunnel_cmd in tasks/cloud/tunnel.py, which has none",
        f"{RUNBOOK}:2 names tasks/tunnels.py, which does not exist",
    ]


def test_a_signature_key_missing_from_the_table_or_made_up_is_a_problem() -> None:
    source = '_sig(\n    "docker-missing",\n    r"x",\n)\n_sig("disk-full", r"y")\n'
    assert signature_problems("key `docker-missing`; `disk-full`", source) == []
    assert signature_problems("key `docker-missing`, key `dockr-gone`", source) == [
        f"{RUNBOOK} does not name the diagnosis key `disk-full` of {DIAGNOSE}: add it to §7",
        f"{RUNBOOK} names the diagnosis key `dockr-gone`, which {DIAGNOSE} SIGNATURES does not"
        " hold",
    ]
    assert signature_problems("", "SIGNATURES = ()") == [f"no signature keys found in {DIAGNOSE}"]


# --- the repository ---------------------------------------------------------------------------


def test_every_citation_in_the_code_resolves() -> None:
    sources = _sources()
    assert "flows/preview.py" in sources and "README.md" in sources
    assert {"s2-3", "s7"} <= {a for text in sources.values() for a in cited_sections(text)}
    assert citation_problems(sources, _docs()) == []


def test_the_documents_name_what_the_code_holds() -> None:
    assert reference_problems(_docs(), _repository) == []


def test_the_failure_table_names_every_diagnosis() -> None:
    runbook = (ROOT / RUNBOOK).read_text(encoding="utf-8")
    diagnose = (ROOT / DIAGNOSE).read_text(encoding="utf-8")
    assert signature_problems(runbook, diagnose) == []
