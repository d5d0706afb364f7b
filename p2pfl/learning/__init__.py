"""Learning: the `Learner` seam, `TorchLearner`, built-in models, datasets and partitioners."""

from p2pfl.learning.datasets import Dataset, load_dataset
from p2pfl.learning.learner import EvalResult, FitResult, Learner
from p2pfl.learning.models import build_model
from p2pfl.learning.partition import parse_partition, partition
from p2pfl.learning.torch_learner import TorchLearner, build_learner, make_loaders

__all__ = [
    "Dataset",
    "EvalResult",
    "FitResult",
    "Learner",
    "TorchLearner",
    "build_learner",
    "build_model",
    "load_dataset",
    "make_loaders",
    "parse_partition",
    "partition",
]
