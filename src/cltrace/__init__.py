"""cltrace: cross-layer transcoders, attribution graphs and interventions, offline.

Importing the package is cheap: torch and transformers load only when a stage needs them.
"""

__version__ = "0.1.0"
