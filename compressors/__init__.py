"""Prompt compression under a token budget: self-information, question-aware, extractive, attention-guided."""

from .attention import AttentionCompressor
from .base import CompressionResult, Compressor, resolve_budget
from .extractive import ExtractiveCompressor
from .question import QuestionAwareCompressor
from .selfinfo import SelfInformationCompressor

COMPRESSORS: dict[str, type[Compressor]] = {
    "selfinfo": SelfInformationCompressor,
    "question": QuestionAwareCompressor,
    "extractive": ExtractiveCompressor,
    "attention": AttentionCompressor,
}

__all__ = ["COMPRESSORS", "AttentionCompressor", "CompressionResult", "Compressor", "ExtractiveCompressor",
           "QuestionAwareCompressor", "SelfInformationCompressor", "resolve_budget"]
