"""The engine: vLLM hosted in an engine actor (see docs/development.md, "The rooms")."""
