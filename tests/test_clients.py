"""Real clients against `promptkit serve` on loopback, used as their docs say: the OpenAI SDK, DSPy,
LangChain and lm-eval. Each must come back with a parsed object or the right numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from promptkit.models import resolve_llm
from promptkit.server import BackgroundServer, create_app

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no price list from the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
DATA = Path(__file__).parent / "data"


class Place(BaseModel):
    city: str
    country: str


class GetWeather(BaseModel):
    """Current weather in a city."""

    city: str = Field(description="the city's name")
    unit: Literal["celsius", "fahrenheit"]


@pytest.fixture(scope="module")
def server(real_lm):
    with BackgroundServer(create_app(real_lm)) as srv:
        yield srv


@pytest.fixture(scope="module")
def openai_client(server):
    from openai import OpenAI

    with OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
        yield client


# -- the OpenAI SDK ------------------------------------------------------------------------
def test_openai_parse_response_format(openai_client, real_lm):
    done = openai_client.chat.completions.parse(
        model=real_lm.model, response_format=Place,
        messages=[{"role": "user", "content": "The Louvre is in Paris, France. Where is the Louvre?"}])
    place = done.choices[0].message.parsed
    assert isinstance(place, Place) and place.city


def test_openai_tools_with_parsed_arguments(openai_client, real_lm):
    import openai

    done = openai_client.chat.completions.parse(
        model=real_lm.model, tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
        messages=[{"role": "user", "content": "Is it warm in Rome today, in celsius?"}])
    (call,) = done.choices[0].message.tool_calls
    assert call.function.name == "GetWeather" and isinstance(call.function.parsed_arguments, GetWeather)
    assert done.choices[0].finish_reason == "tool_calls"


def test_openai_streaming_usage(openai_client, real_lm):
    stream = openai_client.chat.completions.create(
        model=real_lm.model, messages=[{"role": "user", "content": "Say hello."}], max_completion_tokens=5,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert text and chunks[-1].usage.prompt_tokens > 0


# -- DSPy -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dspy_lm(server, real_lm):
    """DSPy's LM for an OpenAI-compatible server, declared the way DSPy's lm15 docs say, stating that it
    honours response_format json_schema (which DSPy's JSON adapter then sends)."""
    import dspy
    from dspy._vendor.lm15.access import AccessPolicy, EndpointSupport
    from dspy.lm15 import ModelSupport, OpenAIChatCompat, ProviderDefinition, register_provider

    access = AccessPolicy(provider="promptkit", supports=EndpointSupport(complete=True, stream=True, models=True),
                          auth_modes=("bearer",), base_url=server.url + "/v1")
    register_provider(ProviderDefinition.chat(access, compat=OpenAIChatCompat.preset("vllm")),
                      supports=ModelSupport(response_schema=True, function_calling=True), replace=True)
    return dspy.LM("promptkit/" + real_lm.model, api_key="unused", max_tokens=64, temperature=0.0, cache=False,
                   num_retries=0)


def test_dspy_predict_with_a_typed_output(dspy_lm):
    import dspy

    class Capital(dspy.Signature):
        """Answer the question."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()
        confidence: float = dspy.OutputField(desc="between 0 and 1")

    with dspy.context(lm=dspy_lm):
        pred = dspy.Predict(Capital)(question="What is the capital of France?")
    assert isinstance(pred.answer, str) and pred.answer
    assert isinstance(pred.confidence, float)


def test_dspy_chain_of_thought(dspy_lm):
    import dspy

    with dspy.context(lm=dspy_lm):
        pred = dspy.ChainOfThought("question -> answer: int")(question="How many legs does a cat have?")
    assert isinstance(pred.answer, int) and isinstance(pred.reasoning, str)


# -- LangChain ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(server, real_lm):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=real_lm.model, base_url=server.url + "/v1", api_key="unused", temperature=0,
                      max_tokens=120, max_retries=0, timeout=300)


def test_langchain_with_structured_output(chat_model):
    place = chat_model.with_structured_output(Place).invoke("Big Ben is in London, England. Where is Big Ben?")
    assert isinstance(place, Place) and place.city


def test_langchain_bind_tools(chat_model):
    msg = chat_model.bind_tools([GetWeather], tool_choice="GetWeather").invoke("How cold is Oslo, in celsius?")
    (call,) = msg.tool_calls
    assert call["name"] == "GetWeather"
    GetWeather.model_validate(call["args"])


# -- lm-eval ------------------------------------------------------------------------------
SNIPS_LABELS = ["add to playlist", "book restaurant", "get weather", "play music", "search screening event",
                "search creative work", "rate book"]


def _snips_task(tmp: Path) -> Path:
    """A multiple-choice task over 35 SNIPS utterances (BIG-bench intent_recognition), read from a local file."""
    (tmp / "snips.yaml").write_text(f"""task: promptkit_snips
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / 'snips_intents.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Utterance: {{{{utterance}}}}\\nIntent:"
doc_to_choice: {json.dumps(SNIPS_LABELS)}
doc_to_target: label
metric_list:
  - metric: acc
""")
    return tmp


def test_lm_eval_local_completions_matches_its_hf_model(server, real_lm, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_dir = str(resolve_llm(real_lm.model))
    tasks = TaskManager(include_path=str(_snips_task(tmp_path)))
    served = simple_evaluate(
        model="local-completions", tasks=["promptkit_snips"], task_manager=tasks, batch_size=8,
        model_args=f"model={real_lm.model},base_url={server.url}/v1/completions,tokenizer={model_dir},"
                   "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1")
    local = simple_evaluate(model="hf", tasks=["promptkit_snips"], task_manager=tasks, batch_size=8,
                            model_args=f"pretrained={model_dir},dtype=float32,device=cpu")
    acc = served["results"]["promptkit_snips"]["acc,none"]
    assert acc == local["results"]["promptkit_snips"]["acc,none"]
    assert acc > 1 / len(SNIPS_LABELS)  # better than chance: the scores are real
