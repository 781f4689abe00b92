"""Offline batch inference with NVIDIA NIM `/v1/completions` semantics, on Ray Data and vLLM."""
