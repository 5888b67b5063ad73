"""cltrace.models: loading language models, their family adapters, the bundled models."""

DEFAULT_MODEL = "gemma-3-270m"  # the bundled model used wherever no model is named
