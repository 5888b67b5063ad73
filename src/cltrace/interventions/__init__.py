"""Interventions on transcoder features: steer / ablate / constrained patch / swap, supernodes.

from cltrace.interventions import Intervention, Steerer
steerer = Steerer(model, transcoder)
result = steerer.run("Dallas is a city in the state of", [Intervention(4, 123, None, "scale", 0.0)])
print(result.table())
"""

from cltrace.interventions.steer import Intervention, Result, Steerer, TokenProb
from cltrace.interventions.supernodes import Supernode, load_supernodes, save_supernodes

__all__ = [
    "Intervention",
    "Result",
    "Steerer",
    "TokenProb",
    "Supernode",
    "load_supernodes",
    "save_supernodes",
]
