"""The pages' block markers are well formed, and the machinery of the recipe and figures tests works
(fast: no engine; the recipes and figures themselves run in tests/docs/test_recipes.py and
test_figures.py, long runs)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.docs.blocks import ROOT, all_blocks, blocks, figure_blocks, recipes
from tests.docs.shell import commands, run_recipe, split_comment

_spec = importlib.util.spec_from_file_location("doc_figures", ROOT / "bench" / "doc_figures.py")
doc_figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(doc_figures)


def test_every_bash_block_is_a_recipe_or_says_why_not():
    assert recipes() and any(b.opt_out is None for b in recipes())
    assert not [b.where for b in recipes() if b.opt_out == ""], "`<!-- not run by tests: REASON -->`"


def test_marker_comments_parse():
    """A comment before a block that means to mark it (a typo would silently make a recipe of it, or
    leave figures unchecked) is one of the two forms."""
    bad = [f"{b.where}: <!-- {b.comment} -->" for b in all_blocks() if b.comment
           and ("not run" in b.comment or "figure" in b.comment) and b.opt_out is None and b.figures is None]
    assert not bad, bad


def test_figure_markers_name_a_config_and_a_part():
    assert figure_blocks()
    for block in figure_blocks():
        config, part = block.figures
        assert (ROOT / config).is_file(), f"{block.where}: no {config}"
        assert part in doc_figures.SUBCOMMAND, f"{block.where}: {part} is not one of {list(doc_figures.SUBCOMMAND)}"
        assert block.lang == "", f"{block.where}: a block of figures is printed output, not {block.lang}"


def test_blocks_in_list_items_and_comments(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- not run by tests: needs a GPU -->\n```bash\nnvidia-smi\n```\n\n"
                    "- item\n\n  <!-- figures: configs/x.yaml summary -->\n  ```\n  a: 1\n\n  b: 2\n  ```\n")
    first, second = blocks(page)
    assert (first.lang, first.opt_out, first.text, first.line, first.end) == ("bash", "needs a GPU", "nvidia-smi", 4, 6)
    assert (second.figures, second.indent, second.text) == (("configs/x.yaml", "summary"), "  ", "a: 1\n\nb: 2")
    second.page = page
    assert doc_figures.rewrite(second, "a: 3\nb: 4")
    assert page.read_text().endswith("  <!-- figures: configs/x.yaml summary -->\n  ```\n  a: 3\n  b: 4\n  ```\n")


def test_commands_and_their_comments():
    assert split_comment("cp a b   # copies 'x' # y") == ("cp a b", "copies 'x' # y")
    assert split_comment("echo '#not' \"#a\" x#y") == ("echo '#not' \"#a\" x#y", "")
    assert split_comment('echo "a\\" #b" \\# c  # d') == ('echo "a\\" #b" \\# c', "d")
    cmds = commands("# a comment line\nrun --x \\\n    --y   # answers day-1: 3 rows\nnext   # \"done\", exit 3\n")
    assert [(c.code, c.comment, c.expected_exit) for c in cmds] == [
        ("run --x --y", "answers day-1: 3 rows", 0), ("next", '"done", exit 3', 3)]
    assert commands("for f in a b; do\n  echo $f\ndone\n") is None  # runs as one step


def test_a_recipe_runs_cut_per_command(tmp_path):
    run = run_recipe("mkdir -p output/x\necho one\nsh -c 'echo two; exit 3'   # exit 3\necho three\n", tmp_path)
    assert run.failure() is None, run.output
    assert [s.exit for s in run.steps] == [0, 0, 3, 0]
    assert run.steps[1].output.strip() == "one" and run.steps[2].output.strip() == "two"
    assert "output/x" not in run.steps[0].outputs_before and "output/x" in run.steps[1].outputs_before
    assert (run.scratch / "output" / "x").is_dir() and (run.scratch / "pipeline").is_symlink()
    failed = run_recipe("echo one\nfalse\necho never\n", tmp_path)
    assert [s.exit for s in failed.steps] == [0, 1, None] and "`false` exited 1" in failed.failure()


def table(*rows):
    from pipeline.evaluation.compare import _table  # the comparison's own renderer

    return _table(["variant", "rows", "compl tok", "tok/s", "finish reasons", "mean"], [list(r) for r in rows])


def test_figures_compare_what_reruns_reproduce():
    page = table(("a_seed1_temperature0.8", 10, 100, 55.1, "length:10", 10.0),
                 ("b_temperature0.8", 10, 97, 60.0, "length:9 stop:1", 9.7))
    rerun = table(("a_seed1_temperature0.8", 10, 100, 1234.5, "length:10", 10.0),
                  ("b_temperature0.8", 10, 91, 6.0, "length:10", 9.1))
    assert doc_figures.compare("comparison", page, rerun) == []  # times, and b samples without a seed
    changed = table(("a_seed1_temperature0.8", 10, 100, 55.1, "length:9 stop:1", 10.0),
                    ("b_temperature0.8", 10, 97, 60.0, "length:9 stop:1", 9.7))
    assert doc_figures.compare("comparison", page, changed) == [
        "table 1, a_seed1_temperature0.8, `finish reasons`: the page says 'length:10', the run 'length:9 stop:1'"]
    assert doc_figures.compare("comparison", "\n".join(l.rsplit("  ", 1)[0].rstrip() for l in page.splitlines()),
                               page) == ["table 1: the page lacks the column `mean`"]
    summary = "== job summary ==\nrows in / out:  3 / 3\ntokens:  60 prompt, 9 completion\nwall time:  3.0s"
    assert doc_figures.compare("summary", summary,
                               summary.replace("9 c", "7 c").replace("3.0s", "4.1s") + "\ncost:  x") == []
    assert doc_figures.compare("summary", summary, summary.replace("3 / 3", "3 / 2")) == [
        "`rows in / out`: the page says '3 / 3', the run '3 / 2'"]


def test_figures_are_extracted_from_what_the_command_prints():
    printed = ("progress: ...\n\n== job summary ==\nrows in / out:  3 / 3\n\nsweep: 2 variants (comparison.csv, "
               ".json, .png in out)\nvariant  rows\na        3\n\nvariant  score\na        1\nlog: /tmp/x.log\n")
    assert doc_figures.extract("summary", printed) == "== job summary ==\nrows in / out:  3 / 3"
    assert doc_figures.extract("comparison", printed) == "variant  rows\na        3\n\nvariant  score\na        1"
    assert doc_figures.extract("validation", printed) is None


@pytest.mark.parametrize("config", ["configs/eval-local.yaml", "configs/local-cpu.yaml"])
def test_a_configs_output_path(config):
    assert doc_figures.output_path(config).startswith("output/")
