"""The figures the pages quote agree with a rerun of their source (bench/doc_figures.py: which blocks,
and what is compared exactly; `make doc-figures` rewrites the blocks that differ).

A source's command is the recipe's (`.venv/bin/python -m pipeline run --config CONFIG`): when a recipe
of the pages runs it on a fresh `output/`, its output is taken from that run (tests/docs/conftest.py),
else it runs alone in a scratch copy of the project.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.docs.blocks import ROOT, figure_blocks

pytestmark = [pytest.mark.slow, pytest.mark.engine]

_spec = importlib.util.spec_from_file_location("doc_figures", ROOT / "bench" / "doc_figures.py")
doc_figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(doc_figures)

BLOCKS = figure_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.where}:{b.figures[1]}" for b in BLOCKS])
def test_figures_agree_with_a_rerun(block, runs):
    config, part = block.figures
    printed = runs.output_of(doc_figures.command(config, part), doc_figures.output_path(config))
    fresh = doc_figures.extract(part, printed)
    assert fresh is not None, f"`{doc_figures.command(config, part)}` printed no {part}:\n{printed[-3000:]}"
    diffs = doc_figures.compare(part, block.text, fresh)
    assert not diffs, (f"{block.where} ({config} {part}) differs from a rerun; `make doc-figures` rewrites it:\n"
                       + "\n".join(diffs) + f"\n\nthe run printed:\n{fresh}")
