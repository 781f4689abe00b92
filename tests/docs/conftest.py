"""The pages' recipes, each run once per session in a scratch copy of the project; the figures test
reads a config's output from a recipe that ran its command on a fresh `output/` when there is one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.blocks import recipes
from tests.docs.shell import OUTPUT_DEPTH, RecipeRun, commands, run_recipe


class Runs:
    def __init__(self, parent: Path) -> None:
        self.parent = parent
        self.done: dict[str, RecipeRun] = {}

    def recipe(self, text: str) -> RecipeRun:
        """The block's run (the same text on two pages runs once)."""
        if text not in self.done:
            self.done[text] = run_recipe(text, self.parent)
        return self.done[text]

    def output_of(self, command: str, output: str) -> str:
        """What `command` prints when it starts with no `output` folder: from a recipe that runs it so
        (it runs anyway), else from the command run alone."""
        wanted = " ".join(command.split())
        for block in recipes():
            cmds = [] if block.opt_out else (commands(block.text) or [])
            if any(c.code == wanted for c in cmds):
                run = self.recipe(block.text)
                for step in run.steps:
                    if (step.command and step.command.code == wanted and step.exit == 0
                            and output.startswith("output/")
                            and output.count("/") <= OUTPUT_DEPTH and output not in step.outputs_before):
                        return step.output
        run = self.recipe(command)
        if run.failure():
            raise AssertionError(run.failure())
        return run.steps[0].output


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """The scratch projects stay in pytest's temp dir (its last 3 sessions are kept; a few MB each), so
    a failed recipe's output can be read."""
    return Runs(tmp_path_factory.mktemp("recipes"))
