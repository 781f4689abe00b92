"""The package's rooms and the one direction of their imports (docs/development.md, "The rooms").

Every `import` counts, the ones inside functions too: a lazy import that closes a loop is a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"
MAX_LINES = 420  # "a room a newcomer reads in one sitting": about 400 lines

# room -> the rooms it may import (besides itself). `protocol` and `templates` are single modules.
MAY_IMPORT = {
    "templates": set(),
    "protocol": {"templates"},
    "config": {"protocol", "templates"},
    "io": {"config", "protocol", "templates"},
    "models": {"io", "config"},
    "engine": {"models", "io", "config", "protocol"},
    "evaluation": {"io", "config", "protocol"},
    "reporting": {"io", "config"},
    "pool": {"engine", "models", "io", "config", "protocol"},
    "job": {"pool", "engine", "evaluation", "reporting", "models", "io", "config", "protocol", "templates"},
}
VLLM_ROOMS = {"pipeline.engine"}  # the only room that imports vLLM


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    return "job" if len(parts) == 1 or parts[1] == "__main__" else parts[1]


def imports(path: Path) -> set[str]:
    """The pipeline modules (or packages) a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("pipeline", "vllm"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if (PACKAGE.parent / node.module.replace(".", "/") / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in ("pipeline", "vllm"))
    return found


GRAPH = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_rooms_import_only_downward():
    wrong = []
    for module, targets in GRAPH.items():
        for target in targets:
            if target.startswith("pipeline") and target != "pipeline" and room(target) != room(module) \
                    and room(target) not in MAY_IMPORT[room(module)]:
                wrong.append(f"{module} imports {target}")
    assert wrong == [], "\n".join(wrong)


def test_every_module_is_in_a_known_room():
    assert {room(m) for m in GRAPH} <= set(MAY_IMPORT), sorted({room(m) for m in GRAPH} - set(MAY_IMPORT))


def test_no_import_cycles():
    modules = {m: {t for t in targets if t in GRAPH and t != m} for m, targets in GRAPH.items()}
    # a package's __init__ re-exporting its own modules is not a loop with them
    for package in [m for m in modules if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()]:
        for module in modules:
            if module.startswith(package + "."):
                modules[module].discard(package)
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(modules[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "\n".join(cycles)


def test_no_module_is_longer_than_a_sitting():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, long


def test_only_the_engine_room_imports_vllm():
    importers = {m for m, targets in GRAPH.items() if any(t.split(".")[0] == "vllm" for t in targets)}
    assert importers and all(m.startswith(tuple(VLLM_ROOMS)) for m in importers), sorted(importers)


def test_every_test_path_the_package_names_exists():
    """A docstring or comment that sends the reader to `tests/...` sends them to a file that is there."""
    import re

    named = {(module_name(p), m.group(0).rstrip(".,);:'\"`")) for p in PACKAGE.rglob("*.py")
             for m in re.finditer(r"tests/[A-Za-z0-9_./-]+", p.read_text())}
    assert named, "the package names no test path: the check would be empty"
    missing = sorted(f"{module}: {path}" for module, path in named if not (PACKAGE.parent / path).exists())
    assert missing == [], missing


# Each private internal of another package the pipeline reads: where, and the test that fails when the
# pinned version changes it. Every use carries a `# private-internal:` comment; nothing else reaches in.
PRIVATE_INTERNALS = {
    "pipeline.engine.core_forkserver": ("vLLM MultiprocExecutor._init_executor", "tests/unit/test_core_forkserver.py"),
    "pipeline.engine.prompt_tokens": ("vLLM renderer _tokenize_prompt_async", "tests/unit/test_records.py"),
    "pipeline.engine.engine_args": ("argparse _actions", "tests/unit/test_vllm_args.py"),
    "pipeline.reporting.metrics": ("ray Counter._record", "tests/unit/test_vllm_metrics.py"),
    "pipeline.job.task_index": ("lm_eval.tasks._index", "tests/unit/test_task_index.py"),
    "pipeline.engine.prompt_logprob_reuse": ("vLLM LogprobsProcessor._update_prompt_logprobs",
                                             "tests/integration/test_prompt_logprob_reuse.py"),
}


PUBLIC_UNDERSCORED = {"os._exit", "sys._getframe"}  # documented API, named with an underscore
OURS = {"supervisor._gate"}  # the pipeline's own objects, held in a local name


def _reaching_in(path: Path) -> list[int]:
    """Lines that reach into another package's private name: `module._name` (a module or parser held in
    a name), or an import from a private module (`from lm_eval._cli import ...`)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and isinstance(node.value, ast.Name) and node.value.id not in ("self", "cls") \
                and f"{node.value.id}.{node.attr}" not in PUBLIC_UNDERSCORED | OURS:
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] != "pipeline" \
                and any(part.startswith("_") and not part.startswith("__") for part in node.module.split(".")):
            lines.append(node.lineno)
    return lines


def test_private_internals_are_the_marked_few_each_with_its_test():
    found: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text().splitlines()
        for number in _reaching_in(path):
            found.setdefault(module_name(path), []).append(source[number - 1].strip())
    for module, lines in found.items():
        assert module in PRIVATE_INTERNALS, f"{module} reaches into a private internal: {lines}"
        assert all("# private-internal: " + PRIVATE_INTERNALS[module][0] in line for line in lines), lines
    assert set(found) == set(PRIVATE_INTERNALS), sorted(set(PRIVATE_INTERNALS) - set(found))
    for _, test in PRIVATE_INTERNALS.values():
        assert "private" in (PACKAGE.parent / test).read_text()
