"""Bundled models (placeholder until the GGUF cache lands)."""
BUNDLED: dict = {}


def ensure_model_dir(name):
    raise NotImplementedError
