"""Regenerate the lm-evaluation-harness tasks over local files (deterministic: the same files every run).

    .venv/bin/python data/make_harness_tasks.py [FOLDER] [--docs N]

One task of each request kind, each with a train split for its few-shot examples, so that nothing is
downloaded from the Hugging Face hub (`--include_path data/harness/tasks`):

- tiny_choice (multiple_choice -> loglikelihood): a question and 3 to 5 choices of different lengths
  (digits, punctuation, several words, non-ASCII letters); metrics acc and acc_norm; 2-shot.
- tiny_qa (generate_until): a question and its short answer, greedy until a newline; exact_match; 2-shot.
- tiny_text (loglikelihood_rolling): passages of a few hundred tokens (longer than a 256-token context,
  so a passage takes several rolling windows); word and byte perplexity, bits per byte.
- tiny_mmlu (multiple_choice, MMLU's shape): a passage, a question and options A-D, 5-shot with the
  same five examples first for every document (MMLU's `first_n` sampler; contexts of 700-1,000
  tokens), the answer the letter alone (one token); acc and acc_norm.
- tiny_options (multiple_choice): the same kind of documents, the options' texts as the answers
  (several tokens each), 0-shot; tiny_options_5shot the same 5-shot.

FOLDER (default data/harness) gets the JSONL files and tasks/ their YAMLs; `--docs N` makes N test
documents per task instead of the defaults (the benchmark's 2,000-document task).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20261201
WORDS = ("river stone lantern orchard copper meadow harbour signal thunder velvet garden engine whisper "
         "mountain ladder silver compass winter market candle forest bridge window island north morning").split()
ACCENTED = ["é", "ü", "ñ", "ø", "ç", "å"]
CITIES = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
          ("Egypt", "Cairo"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Poland", "Warsaw"), ("Greece", "Athens"),
          ("Austria", "Vienna"), ("Kenya", "Nairobi"), ("Cuba", "Havana"), ("Chile", "Santiago"), ("Iran", "Tehran")]
DEFAULT_DOCS = {"tiny_choice": 60, "tiny_qa": 24, "tiny_text": 8, "tiny_mmlu": 24, "tiny_options": 24,
                "tiny_options_5shot": 24}
TRAIN_DOCS = 6


def _choice_doc(rng: random.Random, index: int) -> dict:
    a, b = rng.randrange(1, 60), rng.randrange(1, 60)
    right = str(a + b)
    wrong = {str(a + b + d) for d in (-10, -1, 1, 2, 10)} - {right}
    others = rng.sample(sorted(wrong), rng.randrange(1, 3)) + [
        rng.choice(["none of these.", "I do not know!", "forty-one, or so"]),
        f"{rng.choice(WORDS)}{rng.choice(ACCENTED)} {rng.choice(WORDS)}"][: rng.randrange(1, 3)]
    choices = [right, *others]
    rng.shuffle(choices)
    return {"id": index, "question": f"What is {a} plus {b}?", "choices": choices, "answer": choices.index(right)}


def _qa_doc(rng: random.Random, index: int) -> dict:
    if index % 2:
        country, city = rng.choice(CITIES)
        return {"id": index, "question": f"What is the capital of {country}?", "answer": city}
    a, b = rng.randrange(1, 50), rng.randrange(1, 50)
    return {"id": index, "question": f"What is {a} plus {b}?", "answer": str(a + b)}


def _text_doc(rng: random.Random, index: int) -> dict:
    sentences = []
    for _ in range(rng.randrange(14, 22)):
        words = [rng.choice(WORDS) for _ in range(rng.randrange(6, 14))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
    return {"id": index, "text": " ".join(sentences)}


def count(task: str, docs: int | dict[str, int] | None) -> int:
    if isinstance(docs, dict):
        return docs.get(task, DEFAULT_DOCS[task])
    return docs or DEFAULT_DOCS[task]


def _mmlu_doc(rng: random.Random, index: int) -> dict:
    """MMLU's shape: a passage, a question, four options (A-D), the answer's index."""
    passage = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(16, 30))).capitalize() + "."
    a, b = rng.randrange(10, 90), rng.randrange(10, 90)
    right = a + b
    options = [right, right + rng.choice([-10, -1, 1, 10]), right + rng.choice([-2, 2, 11]),
               right - rng.choice([3, 12, 20])]
    options = [f"{n} {rng.choice(WORDS)}s" for n in options]
    order = list(range(4))
    rng.shuffle(order)
    return {"id": index, "passage": passage, "question": f"How many are {a} and {b} together?",
            "choices": [options[i] for i in order], "answer": order.index(0)}


MAKERS = {"tiny_choice": _choice_doc, "tiny_qa": _qa_doc, "tiny_text": _text_doc, "tiny_mmlu": _mmlu_doc,
          "tiny_options": _mmlu_doc, "tiny_options_5shot": _mmlu_doc}
YAMLS = {
    "tiny_choice": {
        "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices", "doc_to_target": "answer", "num_fewshot": 2,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    },
    "tiny_qa": {
        "output_type": "generate_until", "doc_to_text": "Q: {{question}}\nA:", "doc_to_target": " {{answer}}",
        "num_fewshot": 2, "fewshot_delimiter": "\n\n",
        "generation_kwargs": {"until": ["\n", "Q:"], "max_gen_toks": 12, "do_sample": False, "temperature": 0.0},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": True}],
    },
    "tiny_mmlu": {  # 5-shot contexts of 700-1,000 tokens; the answer one token (the letter)
        "output_type": "multiple_choice",
        "doc_to_text": "{{passage}}\nQuestion: {{question}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
                       "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"], "target_delimiter": "", "doc_to_target": "answer",
        "num_fewshot": 5, "fewshot_delimiter": "\n\n", "fewshot_config": {"sampler": "first_n"},  # as MMLU's
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    },
    "tiny_options": {  # the same documents, the options' texts as the answers (several tokens each)
        "output_type": "multiple_choice", "doc_to_text": "{{passage}}\nQuestion: {{question}}\nAnswer:",
        "doc_to_choice": "choices", "doc_to_target": "answer", "num_fewshot": 0, "fewshot_delimiter": "\n\n",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    },
    "tiny_options_5shot": {  # the same, 5-shot
        "output_type": "multiple_choice", "doc_to_text": "{{passage}}\nQuestion: {{question}}\nAnswer:",
        "doc_to_choice": "choices", "doc_to_target": "answer", "num_fewshot": 5, "fewshot_delimiter": "\n\n",
        "fewshot_config": {"sampler": "first_n"},
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    },
    "tiny_text": {
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
    },
}


def make(folder: Path, docs: int | dict[str, int] | None = None) -> Path:
    """Write the tasks' data and YAMLs under `folder`; returns the YAMLs' folder (the include path).
    `docs`: test documents of every task, or per task (default DEFAULT_DOCS)."""
    tasks = folder / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name, maker in MAKERS.items():
        rng = random.Random(f"{SEED}-{name}")
        splits = {"train": [maker(rng, i) for i in range(TRAIN_DOCS)],
                  "test": [maker(rng, i) for i in range(count(name, docs))]}
        files = {}
        for split, rows in splits.items():
            path = folder / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
            files[split] = str(path.resolve())
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
                "training_split": "train", "fewshot_split": "train", "test_split": "test", **YAMLS[name]}
        # JSON is YAML: the harness reads these as task YAMLs
        (tasks / f"{name}.yaml").write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tasks


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default=str(Path(__file__).parent / "harness"))
    parser.add_argument("--docs", type=int, default=None, help="test documents per task")
    args = parser.parse_args()
    print(make(Path(args.folder), args.docs))
