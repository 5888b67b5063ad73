"""Readable circuits (issue 11): automatic supernodes of a pruned attribution graph, the edges
between them, validation on the real model, and an SVG diagram drawn like the paper's figures.

Stage order: after attribution / features / interventions, before the viewer and the CLI.
"""

from cltrace.circuits.circuit import Circuit, CircuitEdge, CircuitNode, circuit_path

__all__ = ["Circuit", "CircuitEdge", "CircuitNode", "circuit_path"]
