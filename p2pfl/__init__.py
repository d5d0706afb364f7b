"""p2pfl: decentralized peer-to-peer gossip learning over MQTT, with no aggregation server.

The public surface is what this module exports; everything else may change between releases.
Names are imported lazily so that `p2pfl --help` and the protocol code do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "EvalResult": "p2pfl.learning.learner",
    "FitResult": "p2pfl.learning.learner",
    "Learner": "p2pfl.learning.learner",
    "Node": "p2pfl.node",
    "NodeConfig": "p2pfl.config",
    "Simulation": "p2pfl.simulation.engine",
    "TorchLearner": "p2pfl.learning.torch_learner",
}

__all__ = [
    "EvalResult",
    "FitResult",
    "Learner",
    "Node",
    "NodeConfig",
    "Simulation",
    "TorchLearner",
    "__version__",
]

if TYPE_CHECKING:
    from p2pfl.config import NodeConfig
    from p2pfl.learning.learner import EvalResult, FitResult, Learner
    from p2pfl.learning.torch_learner import TorchLearner
    from p2pfl.node import Node
    from p2pfl.simulation.engine import Simulation


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'p2pfl' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
