"""The documentation is tested like code.

* Every fenced code block of README.md and docs/*.md runs, or says why it does not:
  ```python blocks run in a fresh Python process; ```bash blocks run their `simfluence ...`
  commands through the command line (in one process, in order, each must exit 0). Both run in a
  temporary directory that holds a small synthetic run set at `runs/` and `demo-out/runs/`
  (what `make demo` leaves there, in miniature). Data blocks (json, toml, text, yaml) are not
  run; a block with no language, or any other language, fails the test.
* An HTML comment on the line right before a block changes what runs, in words the page shows:

      <!-- docs-test: skip: WHY -->              not run (a reason is required)
      <!-- docs-test: small: OLD => NEW; ... --> run with each OLD replaced by NEW (a smaller
                                                  configuration; OLD must occur in the block)

  A bash block with any line that is not a `simfluence` command (or a comment) must be skipped:
  an unmarked block that cannot run fails, so no block escapes silently.
* docs/results.md and the README's headline table equal what `tools/results.py` generates.
* `mkdocs build --strict` builds the site with no warning (slow; skipped without mkdocs, failing
  under CI=true).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import missing_component

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DATA_LANGUAGES = {"json", "toml", "text", "yaml"}
RUN_LANGUAGES = {"python", "bash"}
DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(\w+)\s*:?\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
TIMEOUT = 120


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    directive: str | None  # "skip", "small" or None
    argument: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of `page` with the directive on the line before each."""
    lines = page.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, language = m.group(1), m.group(2)
        start = i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.name}:{start + 1}: unclosed code fence")
        previous = lines[start - 1].strip() if start > 0 else ""
        d = DIRECTIVE.match(previous)
        out.append(
            Block(
                page,
                start + 1,
                language,
                "\n".join(body) + "\n",
                d.group(1) if d else None,
                d.group(2) if d else "",
            )
        )
        i += 1
    return out


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]


def apply_small(block: Block) -> str:
    code = block.code
    for pair in block.argument.split(";"):
        old, sep, new = pair.partition("=>")
        assert sep, f"{block.name}: `small:` takes OLD => NEW pairs separated by ';'"
        old, new = old.strip(), new.strip()
        assert old in code, f"{block.name}: `small:` replaces {old!r}, which the block lacks"
        code = code.replace(old, new)
    return code


def simfluence_commands(block: Block, code: str) -> list[list[str]]:
    """The `simfluence` command lines of a bash block (continuations joined, comments cut)."""
    commands = []
    joined = code.replace("\\\n", " ")
    for raw in joined.splitlines():
        words = shlex.split(raw, comments=True)
        if not words:
            continue
        if words[0] != "simfluence":
            pytest.fail(
                f"{block.name}: `{raw.strip()}` is not a simfluence command; only those run. "
                "Mark the block `<!-- docs-test: skip: WHY -->` if it cannot run here",
                pytrace=False,
            )
        commands.append(words[1:])
    return commands


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a small synthetic run set at runs/ and demo-out/runs/, and examples/."""
    base = tmp_path_factory.mktemp("docs-fixture")
    from simfluence.cli import main

    status = main(
        [
            "synth",
            str(base / "runs"),
            "--pool",
            "40",
            "--tests",
            "10",
            "--runs",
            "16",
            "--per-run",
            "32",
            "--batch",
            "4",
            "--epochs",
            "1",
            "--seed",
            "0",
        ]
    )
    assert status == 0
    (base / "demo-out").mkdir()
    shutil.copytree(base / "runs", base / "demo-out" / "runs")
    (base / "examples").symlink_to(ROOT / "examples")  # pages name examples/ by that path
    return base


def fresh_copy(workdir: Path) -> Path:
    target = Path(tempfile.mkdtemp(prefix="docs-block-"))
    shutil.copytree(workdir, target, symlinks=True, dirs_exist_ok=True)
    return target


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["MPLBACKEND"] = "Agg"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


RUNNER = """
import sys, json
from simfluence.cli import main
for argv in json.loads(sys.argv[1]):
    print("$ simfluence " + " ".join(argv), flush=True)
    status = main(argv)
    if status != 0:
        sys.exit(f"simfluence {argv[0]} exited with status {status}")
"""


def test_every_block_is_runnable_or_marked() -> None:
    """A block's language decides what happens to it; nothing is left unclassified."""
    assert ALL_BLOCKS, "no code blocks found"
    for b in ALL_BLOCKS:
        assert b.language in DATA_LANGUAGES | RUN_LANGUAGES, (
            f"{b.name}: a ```{b.language or '(no language)'} block: label it python or bash "
            f"(it runs) or one of {sorted(DATA_LANGUAGES)} (data, not run)"
        )
        if b.directive is not None:
            assert b.directive in ("skip", "small"), f"{b.name}: unknown directive {b.directive}"
            assert b.language in RUN_LANGUAGES, f"{b.name}: a directive on a data block"
            assert b.argument, f"{b.name}: `{b.directive}:` needs its reason or replacements"


def test_json_blocks_parse_or_say_they_are_abbreviated() -> None:
    """A json block is valid JSON unless it elides fields with `...`."""
    for b in ALL_BLOCKS:
        if b.language == "json" and "..." not in b.code:
            json.loads(b.code)


RUNNABLE = [b for b in ALL_BLOCKS if b.language in RUN_LANGUAGES and b.directive != "skip"]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_code_block_runs(block: Block, workdir: Path) -> None:
    code = apply_small(block) if block.directive == "small" else block.code
    cwd = fresh_copy(workdir)
    try:
        if block.language == "python":
            argv = [sys.executable, "-c", code]
        else:
            commands = simfluence_commands(block, code)
            assert commands, f"{block.name}: a bash block with no command: mark it skip"
            argv = [sys.executable, "-c", RUNNER, json.dumps(commands)]
        proc = subprocess.run(
            argv, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=TIMEOUT
        )
        assert proc.returncode == 0, (
            f"{block.name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    finally:
        shutil.rmtree(cwd, ignore_errors=True)


def test_results_page_is_generated() -> None:
    """docs/results.md and the README's headline table equal what tools/results.py writes."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "results.py"), "--check"],
        capture_output=True,
        text=True,
        env=environment(),
    )
    assert proc.returncode == 0, proc.stderr


def test_readme_is_a_front_door() -> None:
    """Short, and every link stays inside the repository and resolves."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                assert page.name != "README.md", f"README.md: a link out of the repo: {target}"
                continue
            path = target.split("#")[0]
            if not path:
                continue
            resolved = (page.parent / path).resolve()
            assert resolved.exists(), f"{page.name}: a broken link: {target}"
            assert resolved.is_relative_to(ROOT), f"{page.name}: a link out of the repo: {target}"


@pytest.mark.slow
def test_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: no broken link, no missing page, no failed API reference."""
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError:
        missing_component("mkdocs is not installed (pip install -e '.[docs]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
