"""Prompt optimizers: exemplar selection, instruction search (proposed, reflective, joint with
demonstrations), bootstrapped demonstrations, format sensitivity, RAG passage count and order, all
evaluated with prefix-aware call ordering, optionally raced (successive halving with a confidence rule).

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
from .joint import JointSearch
from .racing import Racing
from .rag import RAGSearch
from .reflective import ReflectiveSearch
from .schedule import CostEstimate, PrefixScheduler
from .stages import KNNExemplars

__all__ = [
    "BootstrapFewShot", "BudgetExhausted", "ClaPS", "CostEstimate", "EASE", "FormatSpread", "InstructionSearch",
    "JointSearch", "KNNExemplars", "KNNFewShot", "LabeledFewShot", "Optimizer", "OptimizerError", "PrefixScheduler",
    "RAGSearch", "Racing", "RandomFewShot", "ReflectiveSearch", "Report",
]
