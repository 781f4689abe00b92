"""A sweep's comparison: one line per variant, printed, saved as CSV and JSON, and drawn as a PNG.

Counts come from the shards' tallies; completion lengths (mean, p50, p95 of `usage.completion_tokens`
per record) from one column of the variant's records; tokens per second are the variant's completion
tokens over the time its shards were being answered (overlaps counted once; variants run one after
another on their model's engine, so these are that engine's rates under the variant's requests).

A scored job's lines also carry `scores`: per score value, the mean over the rows scored, its 95%
interval, the count scored and, against the baseline variant, the paired difference over the rows both
scored, with its interval (stats.py says how). Error rows have no score: they are
counted in `errors`, never as wrong.

Cost per variant: the variant's share of its model's engine time (start-up included), split in proportion
to the time its shards were being answered, in accelerator-seconds, output tokens per accelerator-hour
and, with `cost.price_per_accelerator_hour`, money (reporting/cost.py); the variants' costs add up to the
job's. Variants kept from earlier runs cost nothing in this run: n/a.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.io import outputs
from pipeline.config import JobConfig, Variant
from pipeline.io.plan import ROW_KEY
from pipeline.io.records import SCORE
from pipeline.evaluation.stats import paired_difference, summarize
from pipeline.io.storage import filesystem, join, write_bytes, write_text
from pipeline.io.tally import Tally

COLUMNS = ("variant", "model", "params", "rows", "errors", "prompt_tokens", "completion_tokens",
           "tokens_per_s", "finish_reasons", "completion_mean", "completion_p50", "completion_p95",
           "accelerator_s", "output_tokens_per_accelerator_hour", "cost", "cost_per_million_output_tokens")
SCORE_FIELDS = ("mean", "ci_low", "ci_high", "ci", "scored", "diff", "diff_low", "diff_high", "pairs")


def _percentile(ordered: list[int], q: float) -> int:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0


def completion_lengths(config: JobConfig, variant: Variant) -> list[int]:
    """`usage.completion_tokens` of each answered record of the variant, sorted."""
    folder = join(outputs.data_dir(config.output.path), variant.folder())
    fs, path = filesystem(folder)
    if config.output.format == "parquet":
        table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
            columns={"n": pc.field("response", "usage", "completion_tokens")})
        values = table.column("n").drop_null().to_pylist()
    else:
        values = []
        for info in sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.path):
            if info.path.endswith(".jsonl"):
                with fs.open_input_stream(info.path) as stream:
                    for line in stream.read().decode().splitlines():
                        response = json.loads(line)["response"]
                        if response and response["status_code"] == 200:
                            values.append(response["body"]["usage"]["completion_tokens"])
    return sorted(values)


def variant_scores(config: JobConfig, variant: Variant) -> dict[str, dict[str, float]]:
    """Per score value: row key -> value, for the variant's records that have one."""
    folder = join(outputs.data_dir(config.output.path), variant.folder())
    fs, path = filesystem(folder)
    names = config.scoring.outputs()
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
        columns={ROW_KEY: pc.field(ROW_KEY), **{name: pc.field(SCORE, name) for name in names}})
    keys = table.column(ROW_KEY).to_pylist()
    return {name: {k: v for k, v in zip(keys, table.column(name).to_pylist()) if v is not None} for name in names}


def score_lines(config: JobConfig, variants: list[Variant]) -> tuple[str, list[dict[str, dict[str, Any]]]]:
    """The baseline's name, and per variant: per score value, its summary and paired difference."""
    baseline = config.scoring.baseline or variants[0].name
    values = {v.name: variant_scores(config, v) for v in variants}
    lines = []
    for variant in variants:
        lines.append({name: {**summarize(list(by_key.values())),
                             **paired_difference(by_key, values[baseline][name])}
                      for name, by_key in values[variant.name].items()})
    return baseline, lines


def comparison(config: JobConfig, variants: list[Variant], tallies: dict[str, Tally],
               costs: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """`costs`: per variant answered in this run, its share of the engines' cost (reporting/cost.py);
    a variant whose shards were all kept from earlier runs has none (None in its line)."""
    lines = []
    costs = costs or {}
    baseline, scores = score_lines(config, variants) if config.scoring is not None else (None, [])
    for variant in variants:
        tally = tallies[variant.name]
        lengths = completion_lengths(config, variant)
        busy = tally.busy_s()
        lines.append({
            "variant": variant.name,
            "model": variant.served_name,
            "params": json.dumps(variant.params, sort_keys=True),
            "rows": tally.rows,
            "errors": tally.rows - tally.completions,
            "prompt_tokens": tally.prompt_tokens,
            "completion_tokens": tally.completion_tokens,
            "tokens_per_s": round(tally.completion_tokens / busy, 1) if busy else 0.0,
            "finish_reasons": dict(sorted(tally.finish_reasons.items())),
            "completion_mean": round(statistics.fmean(lengths), 1) if lengths else 0.0,
            "completion_p50": _percentile(lengths, 0.5),
            "completion_p95": _percentile(lengths, 0.95),
            **_cost_fields(costs.get(variant.name)),
        })
    for line, score in zip(lines, scores):
        line.update(baseline=baseline, scores=score)
    return lines


def _cost_fields(cost: dict[str, Any] | None) -> dict[str, Any]:
    cost = cost or {}
    return {"accelerator_s": cost.get("accelerator_s"),
            "output_tokens_per_accelerator_hour": cost.get("output_tokens_per_accelerator_hour"),
            "cost": cost.get("total"), "cost_per_million_output_tokens": cost.get("per_million_output_tokens")}


def _money(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _table(head: list[str], body: list[list[Any]]) -> str:
    widths = [max(len(str(row[i])) for row in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [head] + body)


def _interval(low: float | None, high: float | None, signed: bool = False) -> str:
    if low is None or high is None:
        return "n/a"
    return f"[{low:+.3f}, {high:+.3f}]" if signed else f"[{low:.3f}, {high:.3f}]"


def render_scores(lines: list[dict[str, Any]]) -> str:
    """Quality first: one line per variant and score value."""
    baseline = lines[0]["baseline"]
    head = ["variant", "score", "mean", "95% CI", "scored", "errors", f"diff vs {baseline or '(job)'}",
            "95% CI", "pairs"]
    body = []
    for line in lines:
        for name, s in line["scores"].items():
            mean = "n/a" if s["mean"] is None else f"{s['mean']:.3f}"
            diff = "n/a" if s["diff"] is None else f"{s['diff']:+.3f}"
            body.append([line["variant"] or "(job)", name, mean, _interval(s["ci_low"], s["ci_high"]) + f" {s['ci']}",
                         s["scored"], line["errors"], diff, _interval(s["diff_low"], s["diff_high"], True),
                         s["pairs"]])
    return _table(head, body)


def render(lines: list[dict[str, Any]]) -> str:
    """The comparison as aligned text tables: the scores (a scored job), then throughput and lengths."""
    head = ["variant", "rows", "errors", "prompt tok", "compl tok", "tok/s", "finish reasons",
            "mean", "p50", "p95", "accel-s", "cost", "per M out"]
    body = [[line["variant"] or "(job)", line["rows"], line["errors"], line["prompt_tokens"],
             line["completion_tokens"], line["tokens_per_s"],
             " ".join(f"{k}:{v}" for k, v in line["finish_reasons"].items()),
             line["completion_mean"], line["completion_p50"], line["completion_p95"],
             _money(line.get("accelerator_s")), _money(line.get("cost")),
             _money(line.get("cost_per_million_output_tokens"))] for line in lines]
    tables = [render_scores(lines)] if lines and "scores" in lines[0] else []
    return "\n\n".join(tables + [_table(head, body)])


def _quality_panels(axes: Any, lines: list[dict[str, Any]]) -> None:
    """Mean score with its 95% interval, and the paired difference from the baseline with its interval:
    horizontal bars, one group per variant (labels stay readable with many variants), in the sweep's order."""
    from matplotlib.ticker import MaxNLocator

    names = list(lines[0]["scores"])
    y = range(len(lines))
    height = 0.8 / len(names)
    for k, name in enumerate(names):
        offsets = [i - 0.4 + height * (k + 0.5) for i in y]
        for ax, value, low, high in ((axes[0], "mean", "ci_low", "ci_high"), (axes[1], "diff", "diff_low", "diff_high")):
            stats = [line["scores"][name] for line in lines]
            centre = [s[value] if s[value] is not None else 0.0 for s in stats]
            errors = [[max(0.0, c - s[low]) if s[low] is not None else 0.0 for c, s in zip(centre, stats)],
                      [max(0.0, s[high] - c) if s[high] is not None else 0.0 for c, s in zip(centre, stats)]]
            ax.barh(offsets, centre, height=height, xerr=errors, capsize=2, label=name)
    axes[0].set_yticks(list(y), [line["variant"] or "(job)" for line in lines], fontsize="small")
    axes[1].set_yticks(list(y), [""] * len(lines))  # the same rows as on the left
    for ax in axes:
        ax.set_ylim(len(lines) - 0.5, -0.5)  # the first variant on top
    axes[0].set_title("mean score, 95% interval", fontsize="medium")
    highest = max([s["ci_high"] or 0.0 for line in lines for s in line["scores"].values()] + [1.0])
    axes[0].set_xlim(min([s["ci_low"] or 0.0 for line in lines for s in line["scores"].values()] + [0.0]),
                     highest * 1.05)  # 0 to 1 for the built-in scorers; a python scorer's values may range wider
    axes[0].legend(loc="best", fontsize="small")
    axes[1].axvline(0, color="black", linewidth=0.8)
    axes[1].set_title("paired difference from the baseline, 95% interval", fontsize="medium")
    axes[1].set_xlabel(f"minus {lines[0]['baseline'] or '(job)'}", fontsize="small")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(5))


def plot(lines: list[dict[str, Any]]) -> bytes:
    """Four panels, one bar per variant: tokens/s, completion length (mean, p50-p95), errors, finish reasons;
    a scored job's quality panels (mean score, difference from the baseline) come first, on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [line["variant"] or "(job)" for line in lines]
    x = range(len(names))
    scored = bool(lines) and bool(lines[0].get("scores"))
    width = max(8, 1.1 * len(names) + 4) + (0.08 * max(len(n) for n in names) if scored else 0)  # room for labels
    quality_height = max(2.5, 0.3 * len(names) * (len(lines[0]["scores"]) if scored else 0) + 1)
    fig = plt.figure(figsize=(width, 8 + (quality_height if scored else 0)))
    grid = fig.add_gridspec(3 if scored else 2, 2, height_ratios=([quality_height] if scored else []) + [4, 4])
    if scored:
        _quality_panels([fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])], lines)
    top = 1 if scored else 0
    first = fig.add_subplot(grid[top, 0])
    axes = [[first, fig.add_subplot(grid[top, 1], sharex=first)],
            [fig.add_subplot(grid[top + 1, 0], sharex=first), fig.add_subplot(grid[top + 1, 1], sharex=first)]]
    axes[0][0].bar(x, [line["tokens_per_s"] for line in lines], color="tab:blue")
    axes[0][0].set_title("completion tokens / s")
    means = [line["completion_mean"] for line in lines]
    axes[0][1].bar(x, means, color="tab:green", label="mean")
    axes[0][1].vlines(x, [line["completion_p50"] for line in lines], [line["completion_p95"] for line in lines],
                      color="black", label="p50 to p95")
    axes[0][1].set_title("completion length (tokens per record)")
    axes[0][1].legend(loc="best", fontsize="small")
    axes[1][0].bar(x, [line["errors"] for line in lines], color="tab:red")
    axes[1][0].set_title("error records")
    axes[1][0].set_ylim(0, max([1] + [line["errors"] for line in lines]) * 1.1)
    bottom = [0] * len(lines)
    for reason in sorted({r for line in lines for r in line["finish_reasons"]}):
        counts = [line["finish_reasons"].get(reason, 0) for line in lines]
        axes[1][1].bar(x, counts, bottom=bottom, label=reason)
        bottom = [b + c for b, c in zip(bottom, counts)]
    axes[1][1].set_title("finish reasons (choices)")
    axes[1][1].legend(loc="best", fontsize="small")
    for ax in axes[0]:
        ax.tick_params(labelbottom=False)
    for ax in axes[1]:
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize="small")
    fig.suptitle("sweep comparison")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_comparison(config: JobConfig, variants: list[Variant], tallies: dict[str, Tally],
                     costs: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """comparison.csv, comparison.json and comparison.png beside the records; returns the lines."""
    lines = comparison(config, variants, tallies, costs)
    sink = io.StringIO()
    names = config.scoring.outputs() if config.scoring is not None else []
    writer = csv.DictWriter(sink, fieldnames=[*COLUMNS, *(["baseline"] if names else []),
                                              *(f"{n}_{f}" for n in names for f in SCORE_FIELDS)])
    writer.writeheader()
    for line in lines:  # the CSV is flat: one column per score value and statistic
        flat = {k: v for k, v in line.items() if k != "scores"}
        flat.update({f"{n}_{f}": v for n, stats in line.get("scores", {}).items() for f, v in stats.items()})
        writer.writerow({**flat, "finish_reasons": json.dumps(line["finish_reasons"])})
    write_text(join(config.output.path, "comparison.csv"), sink.getvalue())
    write_text(join(config.output.path, "comparison.json"), json.dumps(lines, indent=2))
    write_bytes(join(config.output.path, "comparison.png"), plot(lines))
    return lines
