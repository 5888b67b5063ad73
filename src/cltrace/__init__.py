"""cltrace: cross-layer transcoders, attribution graphs and interventions, offline.

Importing the package is cheap: torch and transformers load only when a stage needs them.
The notebook API (`cltrace.load`, `cltrace.trace`, `cltrace.intervene`, `cltrace.feature`,
see `cltrace.api`) is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it; each is imported when first asked for. (`feature`, not
# `features`: cltrace.features is the feature-store subpackage.)
_LAZY = {
    "load": "cltrace.api",
    "trace": "cltrace.api",
    "intervene": "cltrace.api",
    "swap_interventions": "cltrace.api",
    "feature": "cltrace.api",
    "feature_store": "cltrace.api",
    "LoadedRun": "cltrace.runs",
    "Run": "cltrace.runs",
    "Intervention": "cltrace.interventions.steer",
    "AttributionConfig": "cltrace.attribution.config",
    "DEFAULT_MODEL": "cltrace.models",
    "show": "cltrace.viewer.notebook",
}

if TYPE_CHECKING:
    from cltrace.api import feature, feature_store, intervene, load, swap_interventions, trace
    from cltrace.attribution.config import AttributionConfig
    from cltrace.interventions.steer import Intervention
    from cltrace.models import DEFAULT_MODEL
    from cltrace.runs import LoadedRun, Run
    from cltrace.viewer.notebook import show


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cltrace' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AttributionConfig",
    "DEFAULT_MODEL",
    "Intervention",
    "LoadedRun",
    "Run",
    "__version__",
    "feature",
    "feature_store",
    "intervene",
    "load",
    "show",
    "swap_interventions",
    "trace",
]
