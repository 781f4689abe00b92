"""An evaluation's requests cut into request files for prefix reuse (docs/evaluation.md#a-shared-context-computed-once).

The requests arrive in the order of their prompts, so those that share a prefix are neighbours: a
document's choices after its context, documents after the same few-shot examples. Each request file is
one shard (the job's `output.rows_per_file` is the largest file's rows), so

- a document's requests are never cut apart: they are in one shard, answered by one engine, one after
  the other, the first computing the context the others read from the prefix cache;
- a file's affinity, the hash of its prompts' first PREFIX_TOKENS tokens (the few-shot examples'
  start), names the prefix its documents share; shards with the same affinity go to the same engine
  (engine/shard_calls.py `Placement`), whose prefix cache holds it.

Its name is `<number>-<affinity>.parquet`: the number keeps the order, `affinity_of` reads the rest.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from pathlib import PurePosixPath
from typing import Any, Hashable, Sequence

PREFIX_TOKENS = 128  # one KV block of vLLM's CPU engine, eight of a GPU engine's


def prefix_affinity(prompt: Any) -> str:
    """The hash of a prompt's first PREFIX_TOKENS tokens (token ids), or characters (text); a prompt of
    one prompt (`[[ids]]`, as the harness sends it) is that prompt's."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        data = prompt[:PREFIX_TOKENS * 4].encode()
    else:
        data = array("q", list(prompt)[:PREFIX_TOKENS]).tobytes()
    return hashlib.blake2b(data, digest_size=6).hexdigest()


def cut(documents: Sequence[Hashable], affinities: Sequence[str], target_rows: int) -> list[tuple[int, int, str]]:
    """The files of requests in this order, as (start, stop, affinity): `documents[i]` is request i's
    document (its requests are neighbours), `affinities[i]` its prefix affinity. A file ends at a
    document's end once it has `target_rows` rows, or half as many when the next document's affinity
    differs; its affinity is that of most of its rows."""
    files: list[tuple[int, int, str]] = []
    start = 0
    for i in range(1, len(documents) + 1):
        if i < len(documents) and documents[i] == documents[i - 1]:
            continue  # inside a document
        rows = i - start
        last = i == len(documents)
        if last or rows >= target_rows or (affinities[i] != affinities[i - 1] and 2 * rows >= target_rows):
            files.append((start, i, Counter(affinities[start:i]).most_common(1)[0][0]))
            start = i
    return files


def file_name(number: int, affinity: str) -> str:
    return f"{number:05d}-{affinity}.parquet"


def affinity_of(path: str) -> str:
    """The affinity in a request file's name (`file_name`); "" for another name."""
    stem = PurePosixPath(path).stem
    return stem.split("-", 1)[1] if "-" in stem else ""
