"""Structured generation: masks, penalties and bias on their own, then constrained decoding with the real model."""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from promptkit.backends.base import SamplingParams
from promptkit.structured import (
    Constraint, ConstraintError, allocate_bitmask, apply_logit_bias, apply_masks, apply_penalties, closed_objects,
    compile_constraint, fill_masks, process_logits, processor_for, token_counts,
)


@pytest.fixture(scope="module")
def tok(real_lm):
    return real_lm.backend.tokenizer


def allowed(bitmask: torch.Tensor, row: int, vocab: int) -> set[int]:
    bits = ((bitmask[row][:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
    return set(bits.nonzero().flatten().tolist())


# -- the pieces ----------------------------------------------------------------------------
def test_constraint_needs_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        Constraint(regex="a", choices=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        Constraint()
    with pytest.raises(ValueError, match="non-empty"):
        Constraint(choices=["a", ""])
    assert Constraint.of() is None


def test_uncompilable_constraints_say_why(tok):
    with pytest.raises(ConstraintError, match="look-around"):
        compile_constraint(Constraint(regex="(?<=a)b"), tok)
    with pytest.raises(ConstraintError):
        compile_constraint(Constraint(grammar="start: undefined_rule"), tok)


def test_batched_masks_equal_one_state_at_a_time(tok):
    """fill_masks over a batch (in parallel) gives each row what that state allows alone; None rows allow all."""
    vocab = len(tok)
    g1 = compile_constraint(Constraint(choices=["Paris", "London"]), tok)
    g2 = compile_constraint(Constraint(regex=r"[0-9]{2}"), tok)
    s1, s2 = g1.new_state(), g2.new_state()
    s2.consume(tok.encode("4", add_special_tokens=False)[0])
    batch = allocate_bitmask(3, vocab)
    fill_masks([s1, None, s2], batch)
    for state, row in ((s1, 0), (s2, 2)):
        alone = allocate_bitmask(1, vocab)
        fill_masks([state], alone)
        assert allowed(batch, row, vocab) == allowed(alone, 0, vocab)
    assert len(allowed(batch, 1, vocab)) == vocab
    digits = allowed(batch, 2, vocab)
    assert digits and all(re.fullmatch(r"[0-9]", tok.decode([t])) for t in digits)
    assert {tok.decode([t]) for t in allowed(batch, 0, vocab)} >= {"Paris", "London"}


def test_a_state_with_no_allowed_token_allows_only_eos(tok):
    state = compile_constraint(Constraint(regex="yes|no"), tok, eos_ids=[2]).new_state()
    assert not state.consume(tok.encode("maybe", add_special_tokens=False)[0])  # rejected: error state
    assert state.error and state.is_finished()
    mask = allocate_bitmask(1, len(tok))
    fill_masks([state], mask)
    assert allowed(mask, 0, len(tok)) == {2}


def test_apply_masks_handles_ragged_vocabularies():
    logits = torch.zeros(2, 70)  # 70 logits, a mask 2 words (64 bits) wide: tokens 64..69 are disallowed
    mask = torch.zeros(2, 2, dtype=torch.int32)
    mask[0, 0] = 0b101  # tokens 0 and 2
    mask[1, 1] = -(1 << 31)  # bit 31 of word 1: token 63
    apply_masks(logits, mask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [63]


def test_penalties_and_bias_follow_openai():
    logits = torch.zeros(2, 5)
    counts = token_counts([[1, 1, 3], []], 5)
    assert counts[0].tolist() == [0, 2, 0, 1, 0] and counts[1].sum() == 0
    apply_penalties(logits, counts, presence=torch.tensor([0.5, 0.5]), frequency=torch.tensor([1.0, 1.0]))
    assert logits[0].tolist() == [0, -2.5, 0, -1.5, 0] and logits[1].tolist() == [0] * 5
    apply_logit_bias(logits, [None, {4: 100.0, 0: -100.0}])
    assert logits[1].tolist() == [-100, 0, 0, 0, 100]


def test_process_logits_applies_each_rows_own_processors(tok):
    vocab = len(tok)
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams(logit_bias={7: 5.0}),
              SamplingParams(constraint=Constraint(choices=["yes", "no"]))]
    procs = [processor_for(p, tok) for p in params] + [None]
    logits = torch.zeros(4, vocab)
    process_logits(logits, procs, [[9, 9], [], [], [5]])
    assert logits[0, 9] == -2 and logits[0].count_nonzero() == 1
    assert logits[1, 7] == 5 and logits[1].count_nonzero() == 1
    assert {tok.decode([t]) for t in torch.isfinite(logits[2]).nonzero().flatten().tolist()} <= {"y", "ye", "yes", "n", "no"}
    assert logits[3].count_nonzero() == 0
    assert processor_for(SamplingParams(), tok) is None
    with pytest.raises(ValueError, match="outside the vocabulary"):
        processor_for(SamplingParams(logit_bias={vocab + 5: 1.0}), tok)


def test_closed_objects_closes_only_schemas():
    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {}}},
                                               "extra": {"type": "object", "additionalProperties": True}},
              "$defs": {"D": {"type": "object", "properties": {"x": {"type": "integer"}}}},
              "enum": [{"properties": 1}]}
    out = closed_objects(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["properties"]["properties"]  # a property map, not a schema
    assert out["properties"]["extra"]["additionalProperties"] is True
    assert out["$defs"]["D"]["additionalProperties"] is False
    assert out["enum"] == [{"properties": 1}]


# -- with the real model ------------------------------------------------------------------
class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    street: str
    city: str
    postcode: str | None = None


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=150)
    email: str = Field(json_schema_extra={"format": "email"})
    favourite: Color
    addresses: list[Address] = Field(max_length=2)
    born: dt.date


class Invoice(BaseModel):
    number: str = Field(pattern=r"^INV-[0-9]{4}$")
    total: float
    paid: bool
    currency: Literal["EUR", "USD", "GBP"]
    lines: list[str] = Field(min_length=1, max_length=3)


REAL_SCHEMAS = [
    ("Ann Smith (ann@example.com), 34, was born on 1990-04-02 and lives at 5 Rue Cler, Paris. Her favourite "
     "colour is blue. Describe her.", Person.model_json_schema()),
    ("Invoice INV-0042: two books, 31.50 EUR, already paid. Write it down.", Invoice.model_json_schema()),
    # a GeoJSON point and an npm-style package manifest, as their specs define them (reduced)
    ("Give the location of the Eiffel Tower.",
     {"type": "object", "properties": {"type": {"const": "Point"},
                                       "coordinates": {"type": "array", "items": {"type": "number"},
                                                       "minItems": 2, "maxItems": 2}},
      "required": ["type", "coordinates"]}),
    ("Describe a small JavaScript package.",
     {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z][a-z0-9-]{0,20}$"},
                                       "version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
                                       "private": {"type": "boolean"},
                                       "keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
      "required": ["name", "version"]}),
]


def _run_all(lm, jobs):
    """Generate each (prompt, params) job concurrently, so the engine decodes them as one batch."""
    def one(job):
        text, params = job
        return lm.backend.generate([lm.render(text)], params)[0]

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def test_every_constrained_output_parses_and_validates(real_lm):
    """JSON schemas (pydantic's and real-world ones), regexes, grammars (Lark and GBNF) and choices."""
    regexes = [("Give today's date.", r"\d{4}-\d{2}-\d{2}"),
               ("What is the phone number of the office?", r"\(\d{3}\) \d{3}-\d{4}"),
               ("Write an email address for Bob.", r"[a-z]{1,10}@[a-z]{1,10}\.(com|org)")]
    lark = ('start: expr\nexpr: term (("+" | "-") term)*\nterm: NUMBER | "(" expr ")"\nNUMBER: /[0-9]{1,3}/\n')
    gbnf = 'root ::= item (", " item){0,3}\nitem ::= [a-z]{1,8}'
    choices = ["positive", "negative", "neutral"]
    jobs = [(p, SamplingParams(max_tokens=300, constraint=Constraint(json_schema=s))) for p, s in REAL_SCHEMAS]
    jobs += [(p, SamplingParams(max_tokens=40, constraint=Constraint(regex=r))) for p, r in regexes]
    jobs += [("Write a sum of three small numbers.", SamplingParams(max_tokens=40, constraint=Constraint(grammar=lark))),
             ("List some fruits.", SamplingParams(max_tokens=40, constraint=Constraint(grammar=gbnf))),
             ("Sentiment of 'I loved it':", SamplingParams(max_tokens=10, temperature=1.0, seed=3,
                                                          constraint=Constraint(choices=choices)))]
    gens = _run_all(real_lm, jobs)
    for (prompt, params), g in zip(jobs, gens):
        assert g.finish_reason == "stop", (prompt, g.text)
        c = params.constraint
        if c.json_schema is not None:
            jsonschema.validate(json.loads(g.text), c.json_schema, format_checker=jsonschema.FormatChecker())
        elif c.regex is not None:
            assert re.fullmatch(c.regex, g.text), g.text
        elif c.choices is not None:
            assert g.text in choices
    person = Person.model_validate_json(gens[0].text)
    assert len(person.addresses) <= 2
    Invoice.model_validate_json(gens[1].text)
    expr = gens[len(REAL_SCHEMAS) + len(regexes)].text
    assert re.fullmatch(r"[0-9()+\- ]+", expr) and isinstance(eval(compile(expr, "<expr>", "eval")), int)
    assert re.fullmatch(r"[a-z]{1,8}(, [a-z]{1,8}){0,3}", gens[-2].text)


def _schemas() -> st.SearchStrategy:
    leaf = st.sampled_from([{"type": "string", "maxLength": 12}, {"type": "integer", "minimum": -5, "maximum": 500},
                            {"type": "number"}, {"type": "boolean"}, {"enum": ["a", "b", "c"]},
                            {"type": "string", "format": "date"}, {"type": "null"}])

    def extend(children):
        names = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
        obj = st.dictionaries(names, children, min_size=1, max_size=3).flatmap(
            lambda props: st.sets(st.sampled_from(sorted(props))).map(
                lambda req: {"type": "object", "properties": props, "required": sorted(req)}))
        arr = children.map(lambda c: {"type": "array", "items": c, "maxItems": 3})
        alt = st.lists(children, min_size=2, max_size=2).map(lambda cs: {"anyOf": cs})
        return st.one_of(obj, arr, alt)

    return st.recursive(leaf, extend, max_leaves=6).filter(lambda s: s.get("type") == "object")


@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(schemas=st.lists(_schemas(), min_size=3, max_size=3))
def test_fuzzed_schemas_always_give_valid_json(real_lm, schemas):
    jobs = [("Fill in the record.", SamplingParams(max_tokens=200, temperature=0.7, seed=i,
                                                    constraint=Constraint(json_schema=s)))
            for i, s in enumerate(schemas)]
    for (_, params), g in zip(jobs, _run_all(real_lm, jobs)):
        assert g.finish_reason == "stop", g.text
        jsonschema.validate(json.loads(g.text), params.constraint.json_schema,
                            format_checker=jsonschema.FormatChecker())


def test_a_grammar_that_allows_nothing_ends_cleanly(real_lm):
    g = real_lm.generate("Say something.", grammar=r"start: /[^\s\S]/", max_tokens=10)[0]
    assert g.text == "" and g.finish_reason == "stop" and g.token_ids == []


def test_constrained_greedy_equals_unconstrained_when_it_already_satisfies(real_lm):
    prompts = ["What is the capital of France?", "Name a primary colour."]
    free = _run_all(real_lm, [(p, SamplingParams(max_tokens=10)) for p in prompts])
    jobs, wants = [], []
    for p, g in zip(prompts, free):
        shape = re.escape(g.text[:3]) + r"(?s:.*)"  # any text that starts the way the free answer does
        assert re.fullmatch(shape, g.text)
        for c in (Constraint(regex=shape), Constraint(choices=[g.text, g.text + " and more", "zzz"]),
                  Constraint(grammar="start: /(?s:.+)/")):
            jobs.append((p, SamplingParams(max_tokens=10, constraint=c)))
            wants.append(g)
    for (_, params), got, want in zip(jobs, _run_all(real_lm, jobs), wants):
        assert got.token_ids == want.token_ids and got.text == want.text, (params.constraint, got.text, want.text)


def test_penalties_and_bias_change_the_output_as_asked(real_lm, tok):
    prompt = "Write the word cat five times."
    base = real_lm.generate(prompt, max_tokens=16)[0]
    first = base.token_ids[0]
    forced = tok.encode(" Banana", add_special_tokens=False)[0]
    banned, pushed, penalised = _run_all(real_lm, [
        (prompt, SamplingParams(max_tokens=1, logit_bias={first: -100})),
        (prompt, SamplingParams(max_tokens=1, logit_bias={forced: 100})),
        (prompt, SamplingParams(max_tokens=16, frequency_penalty=2.0))])
    assert banned.token_ids[0] != first and pushed.token_ids == [forced]
    repeats = lambda ids: len(ids) - len(set(ids))  # noqa: E731
    assert repeats(base.token_ids) > 3 and repeats(penalised.token_ids) < repeats(base.token_ids)


class Pet(BaseModel):
    name: str
    kind: Literal["cat", "dog"]


def test_hf_backend_applies_the_same_masks(real_lm, hf_lm):
    prompt = "My dog is called Rex. Describe my pet."
    local = real_lm.generate(prompt, json_schema=Pet, max_tokens=30)[0]
    hf = hf_lm.generate(prompt, json_schema=Pet, max_tokens=30)[0]
    assert hf.finish_reason == local.finish_reason == "stop"
    assert hf.text == local.text and Pet.model_validate_json(hf.text).kind == "dog"


def test_a_processor_called_per_row_keeps_its_grammar_in_step(tok):
    """An engine that only calls processor(row, generated) (no accept_tokens) still gets the right masks."""
    proc = processor_for(SamplingParams(constraint=Constraint(regex=r"[0-9]{2}x")), tok)
    vocab = len(tok)
    digit = tok.encode("4", add_special_tokens=False)[0]
    first = proc(torch.zeros(vocab), [])
    assert torch.isfinite(first[digit])
    third = proc(torch.zeros(vocab), [digit, digit])  # two digits in: only "x" may follow
    assert {tok.decode([t]) for t in torch.isfinite(third).nonzero().flatten().tolist()} == {"x"}
    assert proc.seen == 2
