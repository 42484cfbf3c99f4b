"""promptkit.dspy with real DSPy (no mocks), in-process and through `promptkit serve`: typed signatures
parse under the ChatAdapter and the JSON adapter, the adapters' own formats pass the grammar, threaded
evaluation lands in the engine's batches and shares prefixes, and a small BootstrapFewShot compiles."""

from __future__ import annotations

import enum
import os
from typing import Literal

import pytest
from pydantic import BaseModel

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no price list from the network
dspy = pytest.importorskip("dspy")

from promptkit.dspy import OutputField, PromptkitLM, chat_adapter_fields, chat_adapter_grammar  # noqa: E402
from promptkit.server import BackgroundServer, create_app  # noqa: E402
from promptkit.structured import Constraint, compile_constraint  # noqa: E402

LABELS = Literal["human", "location", "number", "entity"]
QUESTIONS = [("Who wrote Hamlet ?", "human"), ("Where is Rome ?", "location"),
             ("How many legs does a spider have ?", "number"), ("What is the largest animal ?", "entity"),
             ("Who painted the Mona Lisa ?", "human"), ("Where is the Eiffel Tower ?", "location"),
             ("How far away is the Moon ?", "number"), ("What color is the sky ?", "entity")]


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Place(BaseModel):
    city: str
    population: int


class Everything(dspy.Signature):
    """Fill in every field."""

    question: str = dspy.InputField()
    reasoning: str = dspy.OutputField()
    count: int = dspy.OutputField()
    score: float = dspy.OutputField()
    ok: bool = dspy.OutputField()
    kind: Literal["a", "b c"] = dspy.OutputField()
    color: Color = dspy.OutputField()
    tags: list[str] = dspy.OutputField()
    place: Place = dspy.OutputField()


class Capital(dspy.Signature):
    """Answer the question."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()
    confidence: float = dspy.OutputField(desc="between 0 and 1")
    kind: Literal["city", "person", "number"] = dspy.OutputField()


class QuestionType(dspy.Signature):
    """Classify what the question asks for."""

    question: str = dspy.InputField()
    label: LABELS = dspy.OutputField()


@pytest.fixture(scope="module")
def server(real_lm):
    with BackgroundServer(create_app(real_lm)) as srv:
        yield srv


@pytest.fixture(scope="module", params=["in-process", "served"])
def pk_lm(request, real_lm):
    """PromptkitLM on the embedded model: in this process, and through promptkit serve on loopback."""
    if request.param == "in-process":
        return PromptkitLM(real_lm, max_tokens=48, cache=False)
    return PromptkitLM(base_url=request.getfixturevalue("server").url + "/v1", max_tokens=48, cache=False)


def matches(grammar: str, text: str, tokenizer) -> bool:
    """Whether the grammar accepts ``text`` whole (tokenized as the model would write it)."""
    state = compile_constraint(Constraint(grammar=grammar), tokenizer).new_state()
    return state.matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False)) and \
        state.matcher.is_accepting()


# -- the ChatAdapter's format, checked with the adapter's own formatter and parser -----------------
def test_chat_adapter_grammar_holds_what_the_adapter_writes(real_lm):
    adapter, tok = dspy.ChatAdapter(), real_lm.backend.tokenizer
    fields = [OutputField(name, f.annotation) for name, f in Everything.output_fields.items()]
    grammar = chat_adapter_grammar(fields)
    outputs = dict(reasoning="Two facts [one].\nAnd another line.", count=-3, score=2.5, ok=True, kind="b c",
                   color=Color.BLUE, tags=["p", "q"], place=Place(city="Rome", population=3))
    text = adapter.format_assistant_message_content(Everything, outputs).rstrip("\n")
    assert matches(grammar, text, tok)
    assert adapter.parse(Everything, text) == outputs
    wrong = [text.replace("-3", "three"), text.replace("b c", "d"), text.replace("True", "yes"),
             text.replace("[[ ## score ## ]]\n2.5\n\n", ""), text.replace("And another", "[[ ## ok ## ]]")]
    assert not any(matches(grammar, w, tok) for w in wrong)


def test_chat_adapter_fields_come_from_the_adapters_own_request():
    messages = dspy.ChatAdapter().format(Capital, demos=[], inputs={"question": "Capital of Peru?"})
    fields = chat_adapter_fields(messages[-1]["content"])
    assert fields == [OutputField("answer", str), OutputField("confidence", float),
                      OutputField("kind", Literal["city", "person", "number"])]
    assert chat_adapter_fields(dspy.JSONAdapter().format(Capital, [], {"question": "?"})[-1]["content"]) is None


def test_free_text_is_capped_so_every_field_fits():
    grammar = chat_adapter_grammar([OutputField("reasoning", str), OutputField("answer", int)], max_tokens=100)
    assert "[max_tokens=" in grammar.splitlines()[1]
    assert "max_tokens" not in grammar.splitlines()[2]


# -- real generations: typed signatures parse -------------------------------------------------------
def test_typed_signature_parses_under_the_chat_adapter(pk_lm):
    calls = pk_lm.calls
    with dspy.context(lm=pk_lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        pred = dspy.Predict(Capital)(question="What is the capital of France?")
    assert isinstance(pred.answer, str) and pred.answer.strip()
    assert isinstance(pred.confidence, float) and pred.kind in ("city", "person", "number")
    assert pk_lm.calls == calls + 1  # parsed at once: no retry, no second adapter
    assert pk_lm.history[-1]["outputs"][0].startswith("[[ ## answer ## ]]\n")


def test_typed_signature_parses_under_the_json_adapter(pk_lm):
    with dspy.context(lm=pk_lm, adapter=dspy.JSONAdapter()):
        pred = dspy.Predict(Capital)(question="What is the capital of France?")
    assert pk_lm.history[-1]["kwargs"]["response_format"]  # DSPy sent the schema: it knows the engine honours it
    assert isinstance(pred.answer, str) and isinstance(pred.confidence, float)
    assert pred.kind in ("city", "person", "number")


def test_plain_questions_always_parse(real_lm):
    lm = PromptkitLM(real_lm, max_tokens=24, cache=False)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        answers = [dspy.Predict("question -> answer")(question=q).answer
                   for q in ("What is the capital of France?", "How many legs does a cat have?", "Who wrote Hamlet?")]
    assert all(isinstance(a, str) and a.strip() for a in answers)
    assert lm.calls == 3


# -- threads, batches, prefixes and usage --------------------------------------------------------------
def test_threaded_evaluate_batches_and_shares_prefixes(pk_lm, real_lm):
    program = dspy.Predict(QuestionType)
    program.demos = [dspy.Example(question="Who invented the telephone ?", label="human"),
                     dspy.Example(question="What is the capital of Peru ?", label="location")]
    devset = [dspy.Example(question=q, label=a).with_inputs("question") for q, a in QUESTIONS * 2]
    before = real_lm.stats()
    with dspy.context(lm=pk_lm, track_usage=True):
        result = dspy.Evaluate(devset=devset, metric=lambda e, p, trace=None: e.label == p.label, num_threads=8,
                               display_progress=False)(program)
    after = real_lm.stats()
    delta = {k: after[k] - before[k] for k in ("tokens_requested", "tokens_prefilled", "steps")}
    assert delta["tokens_prefilled"] < delta["tokens_requested"] / 3  # instruction and demos prefilled once
    assert delta["steps"] < len(devset)  # one after another it takes at least two steps a call
    usage = [next(iter(p.get_lm_usage().values())) for _, p, _ in result.results]
    assert sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage) > delta["tokens_requested"] / 2
    assert all(u["prompt_tokens"] == u["prompt_tokens_details"]["cached_tokens"]
               + u["prompt_tokens_details"]["cache_creation_tokens"] for u in usage)


def test_bootstrap_fewshot_compiles(real_lm):
    lm = PromptkitLM(real_lm, max_tokens=16, cache=False)
    trainset = [dspy.Example(question=q, label=a).with_inputs("question") for q, a in QUESTIONS[:4]]
    optimizer = dspy.BootstrapFewShot(metric=lambda e, p, trace=None: True, max_bootstrapped_demos=2,
                                      max_labeled_demos=2, max_rounds=1)
    with dspy.context(lm=lm):
        compiled = optimizer.compile(dspy.Predict(QuestionType), trainset=trainset)
        pred = compiled(question="Where is Paris ?")
    assert len(compiled.demos) == 2 and pred.label in ("human", "location", "number", "entity")


def test_state_round_trip(real_lm):
    lm = PromptkitLM(real_lm, max_tokens=32, cache=False)
    again = dspy.BaseLM.load_state(lm.dump_state(), allow_custom_lm_class=True)
    assert isinstance(again, PromptkitLM) and again.model == lm.model and again.kwargs["max_tokens"] == 32
    assert again.supports_response_schema and "response_format" in again.supported_params
