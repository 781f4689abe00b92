"""The pages' fenced blocks and the HTML comments that mark them; a scratch copy of the project to run
them in.

Every ```bash block of README.md and docs/*.md is a local recipe (run by tests/docs/test_recipes.py
exactly as printed) unless the HTML comment right before it opts out, saying why:

    <!-- not run by tests: needs a GPU cluster -->

A block of a run's printed figures names the run it comes from (bench/doc_figures.py reruns it):

    <!-- figures: configs/eval-choice-local.yaml comparison -->

The comment is the last non-blank line before the opening fence.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPEN = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
COMMENT = re.compile(r"^\s*<!--\s*(.*?)\s*-->\s*$")
OPT_OUT = re.compile(r"^not run by tests:\s*(.*)$")
FIGURES = re.compile(r"^figures:\s*(\S+)\s+(\w+)\s*$")
# What a recipe's scratch project leaves out: where jobs write (so nothing lands in the repository) and
# what no recipe reads.
NOT_LINKED = {".git", "output", "out", "results", ".pytest_cache", "build"}


@dataclass
class Block:
    page: Path
    line: int                 # the opening fence's line, 1-based
    end: int                  # the closing fence's line, 1-based
    lang: str
    indent: str               # the fence's indentation (a block inside a list item)
    text: str                 # the lines between the fences, the indentation removed
    comment: str | None       # the HTML comment right before the opening fence

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def opt_out(self) -> str | None:
        """Why a ```bash block is not a recipe (None: it is one)."""
        match = OPT_OUT.match(self.comment or "")
        return match.group(1).strip() if match else None

    @property
    def figures(self) -> tuple[str, str] | None:
        """(config, part) of a block of figures: the config whose run printed them, and which part."""
        match = FIGURES.match(self.comment or "")
        return (match.group(1), match.group(2)) if match else None


def blocks(page: Path, text: str | None = None) -> list[Block]:
    lines = (page.read_text() if text is None else text).splitlines()
    found, i = [], 0
    while i < len(lines):
        match = OPEN.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match.group("indent"), match.group("fence")
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].strip().startswith(fence) and not lines[j].strip()[len(fence):].strip()), len(lines))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        comment = COMMENT.match(before)
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:end]]
        found.append(Block(page, i + 1, end + 1, match.group("lang"), indent, "\n".join(body),
                           comment.group(1) if comment else None))
        i = end + 1
    return found


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks(page)]


def recipes() -> list[Block]:
    """Every ```bash block, opted out or not (Block.opt_out says)."""
    return [block for block in all_blocks() if block.lang == "bash"]


def figure_blocks() -> list[Block]:
    return [block for block in all_blocks() if block.figures]


def scratch_project(parent: str | Path | None = None) -> Path:
    """A new temp dir standing for the project root: a symlink to each top-level entry of the
    repository (.venv, configs, data, jobs, pipeline, tests, ...) but the folders jobs write to, so a
    recipe run from it reads the repository's files and writes `output/` into the temp dir."""
    scratch = Path(tempfile.mkdtemp(prefix="recipe-", dir=parent))
    for entry in ROOT.iterdir():
        if entry.name not in NOT_LINKED:
            (scratch / entry.name).symlink_to(entry)
    return scratch


def environment() -> dict[str, str]:
    """The caller's environment, minus what would send a recipe's job to another Ray."""
    return {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "RAY_JOB_ID"}}


def run_script(script: str, cwd: Path, timeout: float = 1200) -> tuple[int, str]:
    """Run a bash script in `cwd` (its own process group, killed whole on timeout): (exit code, stdout
    and stderr together)."""
    log = cwd / ".recipe-output"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env=environment(), start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = -9
    return code, log.read_text(errors="replace")
