"""promptkit: prompt engineering and RAG pipelines on a local, prefix-caching inference engine."""

from .backends.base import Backend, ContextLengthError, SamplingParams
from .embed import Embedder, get_embedder
from .engine.selective import SelectivePrefill
from .evaluate import EvalResult, evaluate
from .lm import LM, get_lm
from .pipeline import Pipeline, Record, Stage
from .prompt import PromptTemplate
from .recipes import RecipeError, load_recipe
from .registry import register_stage
from .stages import BuildPrompt, Classify, Generate
from .types import Document, Example, Generation, Prompt, Segment, SegmentKind, TokenLogprobs, Usage

__version__ = "0.1.0"

__all__ = [
    "LM", "get_lm", "Backend", "SamplingParams", "ContextLengthError", "Embedder", "get_embedder",
    "evaluate", "EvalResult", "Pipeline", "Record", "Stage", "PromptTemplate", "load_recipe", "RecipeError",
    "register_stage", "BuildPrompt", "Classify", "Generate", "Document", "Example", "Generation", "Prompt",
    "Segment", "SegmentKind", "TokenLogprobs", "Usage", "SelectivePrefill", "__version__",
]
