"""Prompt optimizers: exemplar selection, instruction search, bootstrapped demonstrations,
format sensitivity, all evaluated with prefix-aware call ordering.

Every optimizer follows one shape (DSPy's): ``compile(pipeline, trainset, metric, valset=None)``
returns an improved :class:`~promptkit.pipeline.Pipeline` and a :class:`Report`.
"""

from .base import Optimizer, Report
from .errors import BudgetExhausted, OptimizerError
from .bootstrap import BootstrapFewShot
from .ease import EASE
from .fewshot import KNNFewShot, LabeledFewShot, RandomFewShot
from .formats import FormatSpread
from .instructions import ClaPS, InstructionSearch
from .schedule import PrefixScheduler
from .stages import KNNExemplars

__all__ = [
    "BootstrapFewShot", "BudgetExhausted", "ClaPS", "EASE", "FormatSpread", "InstructionSearch", "KNNExemplars", "KNNFewShot",
    "LabeledFewShot", "Optimizer", "OptimizerError", "PrefixScheduler", "RandomFewShot", "Report",
]
