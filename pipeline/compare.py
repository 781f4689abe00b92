"""A sweep's comparison: one line per variant, printed, saved as CSV and JSON, and drawn as a PNG.

Counts come from the shards' tallies; completion lengths (mean, p50, p95 of `usage.completion_tokens`
per record) from one column of the variant's records; tokens per second are the variant's completion
tokens over the time its shards were being answered (overlaps counted once; variants run one after
another on their model's engine, so these are that engine's rates under the variant's requests).
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

from pipeline import outputs
from pipeline.config import JobConfig, Variant
from pipeline.inputs import filesystem
from pipeline.summary import Tally

COLUMNS = ("variant", "model", "params", "rows", "errors", "prompt_tokens", "completion_tokens",
           "tokens_per_s", "finish_reasons", "completion_mean", "completion_p50", "completion_p95")


def _percentile(ordered: list[int], q: float) -> int:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0


def completion_lengths(config: JobConfig, variant: Variant) -> list[int]:
    """`usage.completion_tokens` of each answered record of the variant, sorted."""
    folder = outputs.data_dir(config.output.path) + "/" + variant.folder()
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


def comparison(config: JobConfig, variants: list[Variant], tallies: dict[str, Tally]) -> list[dict[str, Any]]:
    lines = []
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
        })
    return lines


def render(lines: list[dict[str, Any]]) -> str:
    """The comparison as an aligned text table."""
    head = ["variant", "rows", "errors", "prompt tok", "compl tok", "tok/s", "finish reasons",
            "mean", "p50", "p95"]
    body = [[line["variant"], line["rows"], line["errors"], line["prompt_tokens"], line["completion_tokens"],
             line["tokens_per_s"], " ".join(f"{k}:{v}" for k, v in line["finish_reasons"].items()),
             line["completion_mean"], line["completion_p50"], line["completion_p95"]] for line in lines]
    widths = [max(len(str(row[i])) for row in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [head] + body)


def plot(lines: list[dict[str, Any]]) -> bytes:
    """Four panels, one bar per variant: tokens/s, completion length (mean, p50-p95), errors, finish reasons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [line["variant"] for line in lines]
    x = range(len(names))
    fig, axes = plt.subplots(2, 2, figsize=(max(8, 1.1 * len(names) + 4), 8), sharex=True)
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
    for ax in axes[1]:
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize="small")
    fig.suptitle("sweep comparison")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_comparison(config: JobConfig, variants: list[Variant], tallies: dict[str, Tally]) -> list[dict[str, Any]]:
    """comparison.csv, comparison.json and comparison.png beside the records; returns the lines."""
    lines = comparison(config, variants, tallies)
    root = config.output.path.rstrip("/")
    sink = io.StringIO()
    writer = csv.DictWriter(sink, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({**line, "finish_reasons": json.dumps(line["finish_reasons"])} for line in lines)
    outputs.write_text(f"{root}/comparison.csv", sink.getvalue())
    outputs.write_text(f"{root}/comparison.json", json.dumps(lines, indent=2))
    outputs.write_bytes(f"{root}/comparison.png", plot(lines))
    return lines
