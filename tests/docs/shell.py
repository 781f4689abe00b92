"""A recipe block run as printed, with bash `set -e`, and its output cut per command.

The block's lines run unchanged; between its commands the script prints a marker line (the command's
number and what `output/` holds at that moment), so each command's output, exit code and starting
state can be told apart. A command whose comment states a non-zero exit (`# exit 2`) runs with `set +e`
around it and its exit code is recorded instead of ending the script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tests.docs.blocks import run_script, scratch_project

STEP = re.compile(r"\n?@@recipe-step (\d+) ?(.*)\n")
EXIT = re.compile(r"\n?@@recipe-exit (\d+)\n")
END = "@@recipe-end"
COMPOUND = re.compile(r"(^|\s)(if|then|else|elif|fi|for|while|until|do|done|case|esac|function)(\s|;|$)"
                      r"|<<|[{(|]\s*$|&&\s*$|\|\|\s*$")
STATED_EXIT = re.compile(r"\bexit (\d+)\b")
OUTPUT_DEPTH = 3  # how deep the markers list `output/` (configs write to output/<name>)


def split_comment(line: str) -> tuple[str, str]:
    """A shell line's code and its trailing `# comment` (a `#` at a word start, outside quotes)."""
    quote, escaped = None, False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


@dataclass
class Command:
    first: int                # its lines' indexes in the block, continuation lines included
    last: int
    lines: list[str]          # as printed
    comment: str              # the trailing comment of its last line

    @property
    def code(self) -> str:
        """The command without comments or line continuations, its whitespace collapsed."""
        parts = [split_comment(line)[0].removesuffix("\\") for line in self.lines]
        return " ".join(" ".join(parts).split())

    @property
    def expected_exit(self) -> int:
        match = STATED_EXIT.search(self.comment)
        return int(match.group(1)) if match else 0


def commands(text: str) -> list[Command] | None:
    """The block's commands, or None when it has compound commands (if, for, pipes over lines, here
    documents): such a block runs as one step."""
    found: list[Command] = []
    continued = False
    for i, line in enumerate(text.splitlines()):
        code, comment = split_comment(line)
        if not code.strip():
            continue
        if COMPOUND.search(code):
            return None
        if continued:
            found[-1].last, found[-1].comment = i, comment
            found[-1].lines.append(line)
        else:
            found.append(Command(i, i, [line], comment))
        continued = code.endswith("\\")
    return found


def script(text: str) -> str:
    """The block as a `set -e` script with a marker before each command."""
    listing = f"\"$(find output -maxdepth {OUTPUT_DEPTH} 2>/dev/null | tr '\\n' ' ')\""
    lines = text.splitlines()
    cmds = commands(text)
    if cmds is None:
        return "\n".join(["set -e", f"printf '\\n@@recipe-step 0 %s\\n' {listing}", *lines,
                          f"printf '\\n{END}\\n'"]) + "\n"
    out = ["set -e"]
    starts = {c.first: n for n, c in enumerate(cmds)}
    ends = {c.last: c for c in cmds}
    for i, line in enumerate(lines):
        if i in starts:
            out.append(f"printf '\\n@@recipe-step {starts[i]} %s\\n' {listing}")
            if cmds[starts[i]].expected_exit:
                out.append("set +e")
        out.append(line)
        if i in ends and ends[i].expected_exit:
            out += ["printf '\\n@@recipe-exit %d\\n' \"$?\"", "set -e"]
    out.append(f"printf '\\n{END}\\n'")
    return "\n".join(out) + "\n"


@dataclass
class Step:
    command: Command | None   # None: a block of compound commands, run as one step
    output: str = ""
    exit: int | None = None   # None: not reached
    outputs_before: set[str] = field(default_factory=set)


@dataclass
class RecipeRun:
    text: str
    scratch: Path
    code: int
    output: str
    steps: list[Step]

    def failure(self) -> str | None:
        """What went wrong, in words, or None."""
        for n, step in enumerate(self.steps):
            what = step.command.code if step.command else "the block"
            expected = step.command.expected_exit if step.command else 0
            if step.exit is None:
                return f"step {n} ({what}) never ran"
            if step.exit != expected:
                return f"`{what}` exited {step.exit}, expected {expected}:\n{step.output[-4000:]}"
        if END not in self.output:
            return f"the script ended early (exit {self.code}):\n{self.output[-4000:]}"
        return None


def run_recipe(text: str, parent: Path, timeout: float = 1200) -> RecipeRun:
    """Run a block's text in a new scratch copy of the project under `parent`."""
    scratch = scratch_project(parent)
    code, output = run_script(script(text), scratch, timeout=timeout)
    cmds = commands(text)
    steps = [Step(c) for c in cmds] if cmds is not None else [Step(None)]
    marks = list(STEP.finditer(output))
    for k, mark in enumerate(marks):
        step = steps[int(mark.group(1))]
        end = marks[k + 1].start() if k + 1 < len(marks) else output.find(END, mark.end())
        segment = output[mark.end(): end if end >= 0 else len(output)]
        stated = EXIT.search(segment)
        if stated:
            step.exit = int(stated.group(1))
            segment = segment[:stated.start()] + segment[stated.end():]
        elif k + 1 < len(marks) or end >= 0:
            step.exit = 0
        else:
            step.exit = code  # the step that ended the script
        step.output = segment
        step.outputs_before = set(mark.group(2).split())
    return RecipeRun(text, scratch, code, output, steps)
