"""Grammar engines compared on a CPU: llguidance, xgrammar and outlines-core.

For each engine and tokenizer: the time to compile a set of JSON schemas (pydantic
models of the kinds users write, including the extraction schema of bench/structured.py)
and the mask time per token, replaying a JSON document that matches each schema token
by token (compute the allowed-token mask, then accept the document's next token).
Tokenizers: SmolLM2 (49,152 tokens, the embedded model) and, with ``--gemma DIR``,
Gemma 3 (262,144 tokens; a directory holding its tokenizer files).

    python bench/grammar_engines.py                 # SmolLM2's tokenizer
    python bench/grammar_engines.py --gemma DIR     # and Gemma 3's
    python bench/grammar_engines.py --quick         # two schemas, one repeat

Needs the ``bench`` extras (xgrammar, outlines-core).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from typing import Literal

import _common  # noqa: F401  (puts bench/ on sys.path)
import torch
from _common import emit, log, machine
from pydantic import BaseModel, Field


class Extraction(BaseModel):
    answer: str
    evidence: str


class Address(BaseModel):
    street: str
    city: str
    postcode: str | None = None


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=150)
    tags: list[str]
    role: Literal["admin", "user", "guest"]
    addresses: list[Address]
    born: dt.date


class Invoice(BaseModel):
    number: str = Field(pattern=r"^INV-[0-9]{4}$")
    total: float
    paid: bool
    lines: list[dict[str, float]]


DOCS = {
    "Extraction": Extraction(answer="Denver Broncos", evidence="The Denver Broncos defeated the Carolina Panthers."),
    "Person": Person(name="Ann Smith", age=34, tags=["x", "yz"], role="user", born=dt.date(1990, 4, 2),
                     addresses=[Address(street="5 Rue Cler", city="Paris", postcode="75007")]),
    "Invoice": Invoice(number="INV-0042", total=31.5, paid=True, lines=[{"book": 12.0}, {"pen": 1.5}]),
}


def doc_text(model: BaseModel) -> str:
    return json.dumps(model.model_dump(mode="json"), separators=(", ", ": "))


def time_llguidance(tok, schemas: dict, repeats: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    lltok = llguidance.hf.from_tokenizer(tok)
    out = {}
    for name, (schema, text) in schemas.items():
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        proto = llguidance.LLMatcher(lltok, grammar, log_level=0)
        compile_s = time.perf_counter() - t0
        assert not proto.is_error(), proto.get_error()
        ids = tok.encode(text, add_special_tokens=False)
        mask = lt.allocate_token_bitmask(1, lltok.vocab_size)
        best = float("inf")
        for _ in range(repeats):
            m = proto.deep_copy()
            t0 = time.perf_counter()
            for t in ids:
                lt.fill_next_token_bitmask(m, mask)
                assert m.consume_token(t), m.get_error()
            best = min(best, (time.perf_counter() - t0) / len(ids))
        out[name] = {"compile_ms": compile_s * 1e3, "mask_us_per_token": best * 1e6, "tokens": len(ids)}
    return out


def time_xgrammar(tok, schemas: dict, repeats: int) -> dict:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info)
    out = {}
    for name, (schema, text) in schemas.items():
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                separators=(", ", ": "), strict_mode=True)
        compile_s = time.perf_counter() - t0
        ids = tok.encode(text, add_special_tokens=False)
        mask = xgr.allocate_token_bitmask(1, info.vocab_size)
        best = float("inf")
        for _ in range(repeats):
            m = xgr.GrammarMatcher(compiled)
            t0 = time.perf_counter()
            for t in ids:
                m.fill_next_token_bitmask(mask)
                assert m.accept_token(t)
            best = min(best, (time.perf_counter() - t0) / len(ids))
        out[name] = {"compile_ms": compile_s * 1e3, "mask_us_per_token": best * 1e6, "tokens": len(ids)}
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte's printable stand-in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _token_bytes(tok) -> dict[bytes, list[int]]:
    """Each token's bytes (byte-level BPE or SentencePiece spellings), as outlines-core's Vocabulary wants."""
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    special = set(tok.all_special_ids)
    out: dict[bytes, list[int]] = {}
    for piece, i in tok.get_vocab().items():
        if i in special:
            continue
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            raw = bytes([int(piece[3:5], 16)])
        elif "▁" in piece or not all(c in inverse for c in piece):
            raw = piece.replace("▁", " ").encode()
        else:
            raw = bytes(inverse[c] for c in piece)
        out.setdefault(raw, []).append(i)
    return out


def time_outlines(tok, schemas: dict, repeats: int) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    vocab = Vocabulary(tok.eos_token_id, _token_bytes(tok))
    out = {}
    for name, (schema, text) in schemas.items():
        t0 = time.perf_counter()
        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?")
        index = Index(regex, vocab)
        compile_s = time.perf_counter() - t0
        ids = tok.encode(text, add_special_tokens=False)
        mask = torch.zeros((len(tok) + 31) // 32, dtype=torch.int32)
        best = float("inf")
        for _ in range(repeats):
            guide = Guide(index)
            t0 = time.perf_counter()
            for t in ids:
                guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
                guide.advance(t)
            best = min(best, (time.perf_counter() - t0) / len(ids))
        out[name] = {"compile_ms": compile_s * 1e3, "mask_us_per_token": best * 1e6, "tokens": len(ids)}
    return out


ENGINES = {"llguidance": time_llguidance, "xgrammar": time_xgrammar, "outlines-core": time_outlines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gemma", default=None, help="a directory with Gemma 3's tokenizer files")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from promptkit.models import resolve_llm

    names = ["Extraction", "Person"] if args.quick else list(DOCS)
    schemas = {n: (type(DOCS[n]).model_json_schema(), doc_text(DOCS[n])) for n in names}
    tokenizers = {"smollm2-49k": AutoTokenizer.from_pretrained(resolve_llm("smollm2-135m-instruct"))}
    if args.gemma:
        tokenizers["gemma3-262k"] = AutoTokenizer.from_pretrained(args.gemma)
    torch.set_num_threads(1)
    result: dict = {"bench": "grammar_engines", "machine": machine(), "schemas": names, "results": {}}
    for tname, tok in tokenizers.items():
        for ename, fn in ENGINES.items():
            log(f"{ename} on {tname} ({len(tok)} tokens)")
            try:
                per = fn(tok, schemas, 1 if args.quick else 3)
                result["results"][f"{ename}/{tname}"] = {
                    "mask_us_per_token": sum(v["mask_us_per_token"] for v in per.values()) / len(per),
                    "compile_ms": sum(v["compile_ms"] for v in per.values()) / len(per), "per_schema": per}
            except Exception as e:  # an engine that cannot run here is a finding, not a crash
                result["results"][f"{ename}/{tname}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            log(f"  {result['results'][f'{ename}/{tname}']}"[:200])
    emit(result)


if __name__ == "__main__":
    main()
