"""The pages' local recipes run exactly as printed.

Every ```bash block of README.md and docs/*.md (tests/docs/blocks.py says how a block opts out) is read
from the page at test time and run with bash `set -e` in a scratch copy of the project root (symlinks
to .venv, configs, data, jobs, pipeline, ...; `output/` is the scratch's own), and must exit 0. Outcomes
its comments state are checked too:

- `# exit N`: the command exits N (a non-zero N does not end the block);
- `# "text"`: the command prints the text (double quotes, not inside single ones);
- `# answers FILE: N rows`, `# answers FILE only` (`only: N rows`): the job's summary says this run
  answered N rows, as many as FILE has, every one a completion (its completions grew by as many, its
  errors not at all), and the output's shards of FILE hold exactly those rows, no error among them.

Other comments are words for the reader. Opted-out blocks are listed as skipped, with their reason.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.docs.blocks import recipes

pytestmark = [pytest.mark.slow, pytest.mark.engine]

RECIPES = recipes()
QUOTED = re.compile(r'"([^"]+)"')
ANSWERS = re.compile(r"\banswers (\S+?)(?=:|\s+only\b)(\s+only)?(?::\s*([\d,]+) rows)?")


def summary(output: str) -> dict[str, str]:
    """The job summary's `key: value` lines."""
    _, _, text = output.partition("== job summary ==")
    lines = {}
    for line in text.strip("\n").splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        lines[key.strip()] = value.strip()
    return lines


def number(lines: dict[str, str], key: str) -> int:
    return int(re.match(r"\d+", lines[key]).group())


def check_answers(run, n: int, name: str, rows: int | None) -> list[str]:
    step = run.steps[n]
    lines = summary(step.output)
    if not lines or "this run" not in lines:
        return [f"`{step.command.code}` printed no job summary saying what it ran"]
    earlier = next((summary(s.output) for s in reversed(run.steps[:n]) if "completions" in summary(s.output)), {})
    ran = number(lines, "this run")
    completions = number(lines, "completions") - (number(earlier, "completions") if earlier else 0)
    errors = number(lines, "errors") - (number(earlier, "errors") if earlier else 0)
    out = run.scratch / lines["input -> output"].rsplit(" -> ", 1)[1]
    shard = re.compile(rf"^{re.escape(name)}(\.\w+)?-[0-9a-f]+-\d+\.json$")
    tallies = [json.loads(p.read_text()) for p in (out / "shards").rglob("*.json") if shard.match(p.name)]
    file_rows = sum(t["rows"] for t in tallies)
    file_errors = sum(t["rows"] - t["completions"] for t in tallies)
    problems = []
    if rows is not None and ran != rows:
        problems.append(f"it answered {ran} rows, the comment says {rows}")
    if ran != file_rows:
        problems.append(f"it answered {ran} rows; the output's shards of {name} hold {file_rows}")
    if completions != ran or errors or file_errors:
        problems.append(f"{completions} new completions, {errors} new errors ({file_errors} among {name}'s records) "
                        f"for {ran} rows")
    return [f"`{step.command.code}` ({step.command.comment}): {p}" for p in problems]


@pytest.mark.parametrize("block", RECIPES, ids=[b.where for b in RECIPES])
def test_recipe_runs_as_printed(block, runs):
    if block.opt_out is not None:
        assert block.opt_out, f"{block.where}: an opt-out says why (`<!-- not run by tests: REASON -->`)"
        pytest.skip(f"not run by tests: {block.opt_out}")
    run = runs.recipe(block.text)
    failure = run.failure()
    assert failure is None, f"{block.where} in {run.scratch}: {failure}"
    problems = []
    for n, step in enumerate(run.steps):
        comment = step.command.comment if step.command else ""
        for text in QUOTED.findall(re.sub(r"'[^']*'", "", comment)):  # not JSON in single quotes
            if text not in step.output:
                problems.append(f"`{step.command.code}` did not print {text!r}")
        for name, _, rows in ANSWERS.findall(comment):
            problems += check_answers(run, n, name, int(rows.replace(",", "")) if rows else None)
    assert not problems, f"{block.where}:\n" + "\n".join(problems)
