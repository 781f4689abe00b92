"""Hypothesis strategies for hostile input: request bodies, body-column values and OpenAI batch lines.

Shared by the unit properties (builder and `validate`'s checker, no engine) and the job-level
properties (the real engine). Each strategy draws what a careless or hostile producer could write:
any JSON shape and depth, every request field with values of every type, extreme numbers, unicode
with lone surrogates, NUL and bidi characters, and very long strings.
"""

from __future__ import annotations

import json
import math
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from pipeline.protocol import REQUEST_FIELDS

# CI runs a fixed, derandomized set of examples (the same every run); HYPOTHESIS_PROFILE=long draws
# ten times as many, new ones each run, for a search on a workstation.
settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("long", derandomize=False, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
SCALE = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 1

SERVED = "tiny-llama"
FIELDS = sorted(REQUEST_FIELDS)
# Characters that break naive text handling: NUL, controls, bidi overrides, BOM, line separators,
# both halves of a surrogate pair alone, a noncharacter and the last code point.
ODD_CHARS = ("\x00", "\x07", "\x1b", "\x7f", "\u202e", "\u2066", "\u200b", "\ufeff", "\u2028",
             "\ud800", "\udfff", "\ufffe", "\U0010ffff", "\u0301", "💥")
EXTREME_NUMBERS = (0, -0.0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400, -(10**400),
                   1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf, 0.5, 1.5, 2.0000001)

unicode = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)  # surrogates included
odd_text = st.lists(st.sampled_from(ODD_CHARS) | st.characters(exclude_categories=()), max_size=12).map("".join)
long_text = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=4), st.integers(2_000, 40_000))
plain_text = st.text(max_size=20)  # no surrogates: hypothesis leaves them out unless asked
texts = st.one_of(plain_text, plain_text, unicode, odd_text, long_text, st.sampled_from(["", SERVED, "POST"]))
numbers = st.one_of(st.sampled_from(EXTREME_NUMBERS), st.integers(), st.floats())
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)


def nest(depth: int, kind: str, leaf: object) -> object:
    """`leaf` inside `depth` lists or objects, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


deep = st.builds(nest, st.integers(50, 5_000), st.sampled_from(["list", "dict"]), st.sampled_from([1, "x", None]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
values = st.one_of(json_values, deep, st.lists(st.integers(-10, 100_000), max_size=50),
                   st.lists(texts, max_size=4))
good_prompt = st.sampled_from(["Hello", "The sky is", "1 2 3", "a b c d"])


@st.composite
def bodies(draw: st.DrawFn) -> dict:
    """A request body: some request fields (and maybe unknown ones) with values of any type; often a
    plausible prompt and model so the odd values reach the later checks."""
    body = draw(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values | texts | numbers,
                                max_size=4))
    if draw(st.booleans()):
        body.setdefault("prompt", draw(good_prompt))
    if draw(st.booleans()):
        body.setdefault("max_tokens", draw(st.integers(1, 4)))
    return body


def dumps(value: object) -> str:
    """JSON text as Python writes it (NaN and Infinity included, lone surrogates as \\u escapes), for
    values of any depth: json.dumps itself stops at about a thousand levels."""
    parts: list[str] = []
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Raw):
            parts.append(item.text)
        elif isinstance(item, list):
            stack.append(_Raw("]"))
            for i, element in reversed(list(enumerate(item))):
                stack.append(element)
                if i:
                    stack.append(_Raw(", "))
            parts.append("[")
        elif isinstance(item, dict):
            stack.append(_Raw("}"))
            for i, (key, element) in reversed(list(enumerate(item.items()))):
                stack.append(element)
                stack.append(_Raw(json.dumps(str(key)) + ": "))
                if i:
                    stack.append(_Raw(", "))
            parts.append("{")
        else:
            parts.append(json.dumps(item))
    return "".join(parts)


class _Raw:
    def __init__(self, text: str) -> None:
        self.text = text


def dumps_deep(depth: int) -> str:
    return '{"prompt": "x", "stop": ' + "[" * depth + "]" * depth + "}"


# What a string body column can hold: a body's JSON, a deep one (too deep for json.loads), broken JSON,
# JSON that is not an object, or random text.
raw_bodies = st.one_of(
    bodies().map(dumps),
    st.integers(100, 100_000).map(dumps_deep),
    st.sampled_from(['{"prompt": "cut', "", " ", "null", "[]", "1e999", '"\\ud800"', '{"prompt": NaN}',
                     '{"a": 1, "a": 2}', '{"prompt": "x"}\x00', "\ufeff{}"]),
    unicode, json_values.map(dumps),
)


@st.composite
def batch_lines(draw: st.DrawFn) -> bytes:
    """One line of an OpenAI batch JSONL file, as bytes: a good line, one with a wrong part, a deep or
    huge one, one that is not JSON, or one whose bytes are not UTF-8."""
    kind = draw(st.sampled_from(["good", "odd_part", "odd_body", "deep", "huge", "not_json", "bad_utf8",
                                 "not_object"]))
    line = {"custom_id": draw(st.text(min_size=1, max_size=8)), "method": "POST", "url": "/v1/completions",
            "body": {"prompt": draw(good_prompt), "max_tokens": 2}}
    if kind == "odd_part":
        line[draw(st.sampled_from(["custom_id", "method", "url", "body"]))] = draw(values)
    elif kind == "odd_body":
        line["body"] = draw(bodies())
    elif kind == "deep":
        line["body"] = nest(draw(st.integers(50, 5_000)), draw(st.sampled_from(["list", "dict"])), 1)
    elif kind == "huge":
        line["body"]["prompt"] = "word " * draw(st.integers(20_000, 200_000))
    if kind == "not_json":
        return draw(st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b))
    if kind == "not_object":
        return dumps(draw(json_values)).encode()
    text = dumps(line).encode()
    if kind == "bad_utf8":
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])) + text[cut:]
    if kind == "deep" and draw(st.booleans()):
        depth = draw(st.integers(2_000, 100_000))
        text = b'{"custom_id": "d", "method": "POST", "url": "/v1/completions", "body": ' + b"[" * depth \
            + b"]" * depth + b"}"
    return text


# A struct `body` column: Arrow gives every row every field, a null where a row has none, and one type
# per field; so the odd values are odd in value (extreme, empty, nested, out of range), not in type.
struct_fields = {
    "prompt": st.one_of(good_prompt, st.text(max_size=30), long_text, st.sampled_from(["", "\x00", "\u202e"])),
    "max_tokens": st.one_of(st.integers(-5, 6), st.sampled_from([0, 2**31, 2**63 - 1, -(2**63)])),
    "temperature": st.sampled_from([0.0, -0.0, 0.5, 2.5, -1.0, 1e308, math.nan, math.inf, -math.inf]),
    "n": st.integers(-2, 3),
    "stop": st.lists(st.text(max_size=4), max_size=6),
    "seed": st.sampled_from([0, -1, 2**63 - 1, -(2**63)]),
    "logit_bias": st.dictionaries(st.sampled_from(["1", "2", "99999", "x"]), st.sampled_from([1.0, math.nan, 1e308]),
                                  min_size=1, max_size=2),  # Parquet has no empty struct
    "model": st.sampled_from([SERVED, "other", ""]),
    "echo": st.booleans(),
    "structured_outputs": st.fixed_dictionaries({"regex": st.sampled_from(["a+", "(", "\\d{2}"])})
    | st.fixed_dictionaries({"choice": st.lists(st.text(max_size=3), max_size=2)}),
}
struct_bodies = st.fixed_dictionaries({"prompt": struct_fields["prompt"]},
                                      optional={k: st.none() | v for k, v in struct_fields.items() if k != "prompt"})


def verdict_problem(error: dict | None) -> str | None:
    """What is wrong with a row's verdict (None: valid, or an error body as the product promises)."""
    if error is None:
        return None
    if set(error) != {"message", "type", "param", "code"}:
        return f"not an error body: {error!r}"
    if not 400 <= error["code"] < 500:
        return f"not a 4xx: {error!r}"
    if error["param"] is None and error["type"] != "InvalidBatchLine":
        return f"a 400 naming no field: {error!r}"
    try:
        (error["message"] + str(error["param"] or "")).encode("utf-8")
    except UnicodeEncodeError:
        return f"an error an output file cannot hold: {error!r}"
    return None


# --- a mixed hostile file: `python -m tests.hostile FILE` ---------------------------------------------

def _kinds() -> dict[str, str]:
    """Named hostile request bodies, as the JSON text of a Parquet `body` column."""
    deep = "[" * 3000 + "]" * 3000
    kinds: dict[str, object] = {
        "deep_3000_list": None, "deep_3000_object": None, "deep_150_stop": {"prompt": "x", "stop": nest(150, "list", "a")},
        "surrogate_prompt": {"prompt": "a\ud800b"}, "surrogate_list_prompt": {"prompt": ["ok", "\udfff"]},
        "surrogate_stop": {"prompt": "hi", "stop": "\ud800"}, "surrogate_user": {"prompt": "hi", "user": "\udc00"},
        "surrogate_key": {"prompt": "hi", "logit_bias": {"\ud800": 1}}, "surrogate_model": {"prompt": "hi", "model": "m\ud800"},
        "nul_prompt": {"prompt": "a\x00b"}, "bidi_prompt": {"prompt": "\u202eabc\u2066"}, "bom_prompt": {"prompt": "\ufeffhi"},
        "long_prompt": {"prompt": "word " * 50_000}, "empty_prompt": {"prompt": ""}, "empty_list": {"prompt": []},
        "no_prompt": {"max_tokens": 3}, "null_prompt": {"prompt": None}, "int_prompt": {"prompt": 5},
        "token_ids_out_of_vocab": {"prompt": [1, 2, 10**30]}, "negative_token_id": {"prompt": [-1]},
        "nan_temperature": {"prompt": "hi", "temperature": math.nan}, "inf_top_p": {"prompt": "hi", "top_p": math.inf},
        "neg_zero_temperature": {"prompt": "hi", "temperature": -0.0, "max_tokens": 3},
        "huge_max_tokens": {"prompt": "hi", "max_tokens": 10**400}, "max_tokens_1e308": {"prompt": "hi", "max_tokens": 1e308},
        "negative_max_tokens": {"prompt": "hi", "max_tokens": -1}, "huge_seed": {"prompt": "hi", "seed": 2**64},
        "huge_n": {"prompt": "hi", "n": 10**6}, "string_n": {"prompt": "hi", "n": "2"},
        "nan_logit_bias": {"prompt": "hi", "logit_bias": {"1": math.nan}, "max_tokens": 3},
        "out_of_vocab_logit_bias": {"prompt": "hi", "logit_bias": {"99999": 1}},
        "structured_outputs_string": {"prompt": "hi", "structured_outputs": "x"},
        "structured_outputs_empty": {"prompt": "hi", "structured_outputs": {}},
        "bad_regex": {"prompt": "hi", "structured_outputs": {"regex": "("}},
        "bad_json_schema": {"prompt": "hi", "response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "x", "schema": {"type": 5}}}},
        "response_format_string": {"prompt": "hi", "response_format": "json"},
        "stop_too_many": {"prompt": "hi", "stop": ["x"] * 500}, "stop_empty": {"prompt": "hi", "stop": [""]},
        "stop_wrong_type": {"prompt": "hi", "stop": {"a": 1}}, "echo_stream": {"prompt": "hi", "echo": True, "stream": True},
        "unknown_model": {"prompt": "hi", "model": "nope"}, "unknown_fields": {"prompt": "hi", "max_tokens": 3, "zzz": [1]},
        "suffix": {"prompt": "hi", "suffix": "x"}, "logprobs_huge": {"prompt": "hi", "logprobs": 10**9},
        "vllm_xargs_list": {"prompt": "hi", "vllm_xargs": ["a"]},
    }
    texts = {name: dumps(body) for name, body in kinds.items() if body is not None}
    texts.update(deep_3000_list='{"prompt": "x", "stop": ' + deep + "}",
                 deep_3000_object='{"prompt": "x", "a": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}",
                 not_json='{"prompt": "cut', array="[1, 2]", json_string='"hi"', empty_text="",
                 huge_int_digits='{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}",
                 nan_literal='{"prompt": "hi", "temperature": NaN}', duplicate_keys='{"prompt": "a", "prompt": "b"}')
    return texts


def mixed_hostile_table(good: int = 108) -> "pa.Table":
    """`good` rows with plain prompts, then every hostile kind once: an `id`, a `kind` and a `body`."""
    import pyarrow as pa

    prompts = ["Hello", "The sky is", "1 2 3", "Once upon a time", "a b c d"]
    rows = [(f"good-{i}", "good", dumps({"prompt": prompts[i % len(prompts)], "max_tokens": 4}))
            for i in range(good)]
    rows += [(f"hostile-{name}", name, text) for name, text in _kinds().items()]
    ids, kinds, bodies_ = zip(*rows)
    return pa.table({"id": list(ids), "kind": list(kinds), "body": list(bodies_)})


if __name__ == "__main__":
    import sys

    import pyarrow.parquet as pq

    table = mixed_hostile_table()
    pq.write_table(table, sys.argv[1])
    print(f"{sys.argv[1]}: {table.num_rows} rows ({table.num_rows - 108} hostile)")
