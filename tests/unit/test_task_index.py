"""The harness reads lm-eval's private TaskIndex (tests of the private internal, task_index.py). The harness's index of its built-in tasks, kept between evaluations (job/task_index.py): the cached
index is the one the harness builds, it is built again when a YAML file changes, is added or is
damaged, and `--include_path` folders are indexed every time and still override built-in names."""

import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import lm_eval.tasks  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks._index import TaskIndex  # noqa: E402

from pipeline.job import task_index  # noqa: E402

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
"""


def _folder(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / f"{name}.yaml").write_text(TASK.format(name=name, data=root / "data.jsonl"))
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_index_is_built_once_and_again_when_a_task_file_changes(tmp_path, cache):
    root = _folder(tmp_path / "tasks", ["alpha", "beta"])
    builds = []

    def build(paths):
        builds.append(paths)
        return TaskIndex.build(paths)

    first = task_index.cached(root, build)
    assert sorted(first) == ["alpha", "beta"] and len(builds) == 1
    assert task_index.cached(root, build) == first and len(builds) == 1  # read back, not built

    (root / "beta.yaml").write_text((root / "beta.yaml").read_text().replace("task: beta", "task: gamma"))
    os.utime(root / "beta.yaml", ns=(1, 1))  # another modification time, whatever the clock says
    assert sorted(task_index.cached(root, build)) == ["alpha", "gamma"] and len(builds) == 2
    _folder(root, ["delta"])  # a file added
    assert sorted(task_index.cached(root, build)) == ["alpha", "delta", "gamma"] and len(builds) == 3

    (stored,) = [p for p in cache.iterdir() if task_index.fingerprint(root) in p.name]
    stored.write_bytes(b"not a pickle")  # damaged: indexed again, and replaced
    assert sorted(task_index.cached(root, build)) == ["alpha", "delta", "gamma"] and len(builds) == 4
    assert task_index.cached(root, build) == task_index.cached(root, build) and len(builds) == 4


def test_the_harness_sees_the_same_tasks_with_the_cache_and_include_paths_still_win(tmp_path, cache):
    included = _folder(tmp_path / "mine", ["my_task", "hellaswag"])  # overrides the built-in hellaswag
    task_index.install()
    built = TaskManager(include_path=str(included))  # indexes the built-in tasks and stores them
    assert len(list(cache.iterdir())) == 1
    read = TaskManager(include_path=str(included))  # the built-in tasks from the cache
    assert read._index == built._index and read.all_tasks == built.all_tasks  # noqa: SLF001
    assert len(read.all_tasks) > 1000 and "my_task" in read.all_tasks
    assert read._index["hellaswag"].yaml_path == included / "hellaswag.yaml"  # noqa: SLF001
    builtin = Path(lm_eval.tasks.__file__).parent
    assert read._index["arc_easy"].yaml_path.is_relative_to(builtin)  # noqa: SLF001


def test_a_harness_without_that_index_indexes_its_tasks_itself(monkeypatch):
    import lm_eval.tasks._index as index_module

    monkeypatch.setattr(task_index, "_installed", False)
    monkeypatch.delattr(index_module, "TaskIndex")
    task_index.install()  # no error: the evaluation goes on, the harness indexes as it does
    assert task_index._installed is False  # noqa: SLF001

