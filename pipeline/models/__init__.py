"""What an engine serves: the model's path resolved, the bundled tiny model, and LoRA adapters."""
