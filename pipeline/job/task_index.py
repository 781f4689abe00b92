"""The harness's index of its built-in tasks, kept between evaluations.

Each time lm-evaluation-harness starts (`TaskManager`), it indexes every task it knows: it parses all
the YAML files of its built-in tasks (13,986 in lm-eval 0.4.13; 10 s of CPU on the 2-core development
machine), then loads the one or two tasks the evaluation names. Those files change only when the
harness is installed again, so `pipeline eval` keeps that part of the index in a file
(`~/.cache/batch-completions/lm-eval/`, or `PIPELINE_HARNESS_CACHE`), named by the harness's version,
its tasks folder, and the path, size and modification time of every YAML file in it: a file changed,
added or removed indexes the folder again. Reading the file takes about 1 s.

The index is the harness's own (`TaskIndex.build` over the same folder, stored with pickle as it
returned it), so tasks, groups and tags resolve exactly as they would. Task folders given with
`--include_path` are indexed every time, as the harness indexes them, and override built-in names
as they always do. When the cache cannot be read or written, the harness indexes its tasks itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("PIPELINE_HARNESS_CACHE", Path.home() / ".cache" / "batch-completions" / "lm-eval"))


def fingerprint(root: Path) -> str:
    """The harness's version, the folder, and every YAML file's path, size and modification time."""
    digest = hashlib.sha256(f"{version('lm_eval')}\0{root.resolve()}\0".encode())
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".yaml"):
                stat = os.stat(os.path.join(folder, name))
                digest.update(f"{os.path.relpath(os.path.join(folder, name), root)}\0{stat.st_size}\0"
                              f"{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:24]


def cached(root: Path, build: Callable[[list[Path]], dict[str, Any]]) -> dict[str, Any]:
    """`build([root])`, from the cache when the folder is as it was; built and stored otherwise."""
    path = cache_root() / f"task-index-{fingerprint(root)}.pickle"
    try:
        with path.open("rb") as file:
            return pickle.load(file)
    except FileNotFoundError:
        pass
    except Exception:  # noqa: BLE001 - a damaged or foreign file: index again, and replace it
        log.warning("the harness's cached task index %s could not be read; indexing its tasks again", path,
                    exc_info=True)
    index = build([root])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, delete=False) as file:
            pickle.dump(index, file, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(file.name, path)  # whole, or not at all: another evaluation may be reading it
    except OSError as exc:
        log.info("the harness's task index was not cached (%s); it is built again next time", exc)
    return index


_installed = False


def install() -> None:
    """Make the harness's `TaskIndex.build` take its built-in folder's index from the cache."""
    global _installed
    if _installed:
        return
    import lm_eval.tasks

    try:
        # PRIVATE INTERNAL (lm-eval 0.4.13's TaskIndex, in a private module): a harness without it indexes
        # its tasks itself; tests/unit/test_task_index.py holds both.
        from lm_eval.tasks._index import TaskIndex  # private-internal: lm_eval.tasks._index
        build = TaskIndex.build
    except (ImportError, AttributeError):
        log.info("this lm-eval has no TaskIndex.build; its tasks are indexed at every evaluation")
        return
    builtin = Path(lm_eval.tasks.__file__).parent

    def build_with_cache(paths: Any, *, resolve_includes: bool = True) -> dict[str, Any]:
        paths = [Path(p) for p in paths]
        if not resolve_includes or not paths or paths[0] != builtin:
            return build(paths, resolve_includes=resolve_includes)
        index = cached(builtin, build)  # this call's own: read from the file, or built and stored
        for name, entry in (build(paths[1:]) if paths[1:] else {}).items():
            if name in index:  # as the harness says it when the later folder's task wins
                log.warning("Task '%s' from %s overrides existing task from %s", name, entry.yaml_path,
                            index[name].yaml_path)
            index[name] = entry
        return index

    TaskIndex.build = staticmethod(build_with_cache)
    _installed = True
