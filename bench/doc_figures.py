"""The figures the pages quote, regenerated: each marked block rerun and rewritten in place.

    .venv/bin/python bench/doc_figures.py [--check] [--all] [PAGE or CONFIG ...]    (make doc-figures)

A block of figures is marked by the HTML comment right before its opening fence, naming the config
whose run printed it and which part of the run's output it is (tests/docs/blocks.py):

    <!-- figures: configs/eval-choice-local.yaml comparison -->

    summary     the job summary:   .venv/bin/python -m pipeline run --config CONFIG, from "== job summary =="
    comparison  its comparison:    the same run, the tables after "sweep: ... (comparison.csv ...)"
    validation  the validation:    .venv/bin/python -m pipeline validate --config CONFIG, "== validation =="

Each config runs once, as the recipes do (tests/docs/test_recipes.py): in a scratch copy of the project
root with a fresh `output/`. A block is rewritten with the run's whole part (its times too, so the block
stays one run's figures) when its compared figures differ from the run's (a page may leave out lines and
columns that are not compared); `--all` rewrites every selected block, `--check` rewrites nothing and
exits 1 when a block differs. Arguments select blocks by page or config. After a rewrite, update the
prose around the block that quotes the run (date, machine, wall time, engine loads): this prints them.

What is compared, exactly, and what is not (it legitimately varies from run to run):

- summary and validation, line by line (`key: value`): every line exactly, except `finish reasons`,
  `engine start-up`, `engine utilisation`, `wall time`, `output tokens/s`, `cost` and `checked in`
  (times, and the finish reasons of rows that sample without a seed, as the demo's rows do), and of
  `tokens` only the prompt tokens (the completion tokens vary with those rows).
- comparison tables, cell by cell, rows matched by variant (and score): every column exactly (rows,
  errors, tokens, finish reasons, lengths, scores, intervals, differences, pairs: greedy and seeded
  variants reproduce them, and the intervals use a fixed seed), except `tok/s`, `accel-s`, `cost` and
  `per M out` (times). A variant that samples without a seed (its name has a non-zero `temperature`
  and no `seed`) has only its rows, errors, prompt tokens, scored and pairs compared.
- The page must show every compared line and column of the run, and nothing the run no longer prints.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.docs.blocks import Block, blocks, figure_blocks, run_script, scratch_project  # noqa: E402

SUBCOMMAND = {"summary": "run", "comparison": "run", "validation": "validate"}
IGNORED_LINES = {"finish reasons", "engine start-up", "engine utilisation", "wall time", "output tokens/s",
                 "cost", "checked in"}
PARTIAL_LINES = {"tokens": lambda value: value.split(",")[0].strip()}  # "6597 prompt, 24899 completion"
IGNORED_COLUMNS = {"tok/s", "accel-s", "cost", "per M out"}
SAMPLED_KEPT_COLUMNS = {"variant", "score", "rows", "errors", "prompt tok", "scored", "pairs"}
COMPARISON_HEAD = re.compile(r"^(sweep: \d+ variants|scores) \(comparison\.csv")


def command(config: str, part: str) -> str:
    """The command whose output holds the part, as a recipe prints it."""
    if part not in SUBCOMMAND:
        raise ValueError(f"unknown part {part!r} (one of {', '.join(SUBCOMMAND)})")
    return f".venv/bin/python -m pipeline {SUBCOMMAND[part]} --config {config}"


def output_path(config: str) -> str:
    """Where the config's job writes (relative to the project root, as the config gives it)."""
    output = yaml.safe_load((ROOT / config).read_text()).get("output")
    return str(output if isinstance(output, str) else (output or {}).get("path", "")).rstrip("/")


def extract(part: str, text: str) -> str | None:
    """The part of a command's printed output that a block quotes, or None if it printed none."""
    lines = text.replace("\r", "\n").splitlines()
    if part in ("summary", "validation"):
        head = "== job summary ==" if part == "summary" else "== validation =="
        if head not in lines:
            return None
        start = lines.index(head)
        end = next((i for i in range(start + 1, len(lines))
                    if not lines[i].strip() or lines[i].startswith("log: ")), len(lines))
        return "\n".join(lines[start:end])
    start = next((i for i, line in enumerate(lines) if COMPARISON_HEAD.match(line)), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("log: ")), len(lines))
    return "\n".join(lines[start + 1:end]).strip("\n")


def _key_values(text: str) -> dict[str, str]:
    pairs = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        pairs[key.strip() if sep else line.strip()] = value.strip()
    return pairs


def _compare_lines(page: str, run: str) -> list[str]:
    page_lines, run_lines = _key_values(page), _key_values(run)
    diffs = [f"the run no longer prints `{key}`" for key in page_lines if key not in run_lines]
    for key, value in run_lines.items():
        if key in IGNORED_LINES:
            continue
        keep = PARTIAL_LINES.get(key, lambda v: v)
        if key not in page_lines:
            diffs.append(f"the page lacks `{key}: {value}`")
        elif keep(page_lines[key]) != keep(value):
            diffs.append(f"`{key}`: the page says {keep(page_lines[key])!r}, the run {keep(value)!r}")
    return diffs


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    """An aligned text table (compare.py's): column names (a repeated name gets `#2`) and cells, cut
    at the header's column starts."""
    lines = text.splitlines()
    spans = [(m.start(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", lines[0])]
    names, seen = [], {}
    for _, name in spans:
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    starts = [s for s, _ in spans] + [None]
    rows = [[line[starts[i]:starts[i + 1]].strip() for i in range(len(names))] for line in lines[1:]]
    return names, rows


def sampled(variant: str) -> bool:
    """A variant that samples without a seed: a non-zero temperature in its name and no seed."""
    temperatures = [float(t.rstrip(".")) for t in re.findall(r"temperature([\d.]+)", variant)]
    return any(t != 0 for t in temperatures) and not re.search(r"seed\d+", variant)


def _compare_tables(page: str, run: str) -> list[str]:
    page_tables = [t for t in re.split(r"\n\s*\n", page.strip()) if t.strip()]
    run_tables = [t for t in re.split(r"\n\s*\n", run.strip()) if t.strip()]
    if len(page_tables) != len(run_tables):
        return [f"the page has {len(page_tables)} tables, the run printed {len(run_tables)}"]
    diffs = []
    for n, (page_table, run_table) in enumerate(zip(page_tables, run_tables), 1):
        (page_cols, page_rows), (run_cols, run_rows) = _table(page_table), _table(run_table)
        diffs += [f"table {n}: the run no longer prints the column `{c}`" for c in page_cols if c not in run_cols]
        diffs += [f"table {n}: the page lacks the column `{c}`" for c in run_cols
                  if c not in page_cols and c not in IGNORED_COLUMNS]
        key_cols = [c for c in ("variant", "score") if c in run_cols and c in page_cols]

        def keyed(cols, rows):
            return {tuple(row[cols.index(c)] for c in key_cols): dict(zip(cols, row)) for row in rows}

        page_by_key, run_by_key = keyed(page_cols, page_rows), keyed(run_cols, run_rows)
        if list(page_by_key) != list(run_by_key):
            diffs.append(f"table {n}: the page's rows are {[' '.join(k) for k in page_by_key]}, "
                         f"the run's {[' '.join(k) for k in run_by_key]}")
            continue
        for key, run_row in run_by_key.items():
            is_sampled = sampled(key[0])
            for col, value in run_row.items():
                if col in IGNORED_COLUMNS or col not in page_cols or (is_sampled and col not in SAMPLED_KEPT_COLUMNS):
                    continue
                if page_by_key[key][col] != value:
                    diffs.append(f"table {n}, {' '.join(key)}, `{col}`: the page says "
                                 f"{page_by_key[key][col]!r}, the run {value!r}")
    return diffs


def compare(part: str, page: str, run: str) -> list[str]:
    """How a block's figures differ from a run's (empty: they agree, by the rules above)."""
    return _compare_tables(page, run) if part == "comparison" else _compare_lines(page, run)


def run_source(config: str, part: str, parent: Path | None = None) -> str:
    """Run the part's command in a fresh scratch copy of the project; its printed output."""
    scratch = scratch_project(parent)
    try:
        code, text = run_script(command(config, part), scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if code != 0:
        raise RuntimeError(f"`{command(config, part)}` exited {code}:\n{text[-3000:]}")
    return text


def rewrite(block: Block, new_text: str) -> bool:
    """Replace the block's lines with `new_text`, re-reading the page first (others edit it too): only
    if the block still reads as it did."""
    text = block.page.read_text()
    current = next((b for b in blocks(block.page, text) if b.comment == block.comment and b.text == block.text), None)
    if current is None:
        return False
    lines = text.split("\n")
    lines[current.line:current.end - 1] = [(current.indent + line) if line else line for line in new_text.splitlines()]
    block.page.write_text("\n".join(lines))
    return True


def _run_notes(text: str) -> str:
    lines = _key_values(extract("summary", text) or extract("validation", text) or "")
    return "; ".join(f"{k} {lines[k]}" for k in ("rows in / out", "engine start-up", "wall time", "checked in")
                     if k in lines)


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("select", nargs="*", help="pages or configs whose blocks to regenerate (default: all)")
    args.add_argument("--check", action="store_true", help="compare only; exit 1 when a block differs")
    args.add_argument("--all", action="store_true", help="rewrite every selected block, not only those that differ")
    given = args.parse_args(argv)
    chosen = [b for b in figure_blocks()
              if not given.select or any(s.rstrip("/") in (str(b.page.relative_to(ROOT)), b.figures[0])
                                         for s in given.select)]
    if not chosen:
        print("no marked blocks selected")
        return 2
    outputs: dict[str, str] = {}
    differ = 0
    with tempfile.TemporaryDirectory(prefix="doc-figures-") as parent:
        for block in chosen:
            config, part = block.figures
            cmd = command(config, part)
            if cmd not in outputs:
                print(f"running {cmd}", flush=True)
                outputs[cmd] = run_source(config, part, Path(parent))
            fresh = extract(part, outputs[cmd])
            if fresh is None:
                raise SystemExit(f"{block.where}: `{cmd}` printed no {part}")
            diffs = compare(part, block.text, fresh)
            differ += bool(diffs)
            for diff in diffs:
                print(f"  {block.where} ({config} {part}): {diff}")
            if given.check or not (diffs or given.all):
                print(f"{block.where}: {'differs' if diffs else 'agrees'}")
                continue
            if rewrite(block, fresh):
                print(f"{block.where}: rewritten from this run ({_run_notes(outputs[cmd])}); "
                      "update the prose that quotes the run (date, machine, wall time, engine loads)")
            else:
                print(f"{block.where}: changed on the page meanwhile; not rewritten, run again")
    return 1 if given.check and differ else 0


if __name__ == "__main__":
    sys.exit(main())
