"""Cutting work into units that share a prompt prefix, and placing the units on workers.

Every item (one record for one LM stage) is read as a chain of nested prefixes,
most shared first, straight from its prompt's segments: the render mode (model,
backend, chat template), the system prompt, the instruction, the exemplars, each
retrieved document in turn, the question, the answer prefix. The chains of all
items form a prefix tree; a node's tokens are prefilled once by a worker that
holds it.

Placement cuts the tree into groups (whole subtrees while they fit a worker's fair
share of the cost, so a hot prefix is split and spread rather than idling the other
workers) and assigns the groups, largest first, to the worker where each adds the
least to the longest load: a worker that already holds a group's prefix pays only
for what is new (BatchLLM's global prefix grouping, spread over workers). Each
worker then runs its groups in tree order, so prefixes are used while they are hot.

Nothing here needs Ray; costs are estimated from characters (about four a token).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..pipeline import Record
from ..types import SegmentKind

CHARS_PER_TOKEN = 4
DECODE_WEIGHT = 1.0  # one generated token, in prefill tokens (decoding runs batched)


def estimate_tokens(text: str) -> int:
    """Tokens in ``text``, estimated from its length (no tokenizer needed)."""
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


@dataclass(frozen=True)
class Level:
    """One prefix of an item's prompt: its key (a hash of everything up to here), the tokens it adds, its segment kind."""

    key: str
    tokens: int
    kind: str = ""


_OWN = {SegmentKind.question.value, SegmentKind.answer_prefix.value, "inputs"}


@dataclass
class Item:
    """One record to run through one job's stages."""

    job: int
    index: int
    chain: list[Level]
    extra: float  # cost beyond the prompt: scored label tokens, generated tokens

    @property
    def head(self) -> str:
        """The key of the prompt up to its question: the prefix the item shares with its unit."""
        shared = [level for level in self.chain if level.kind not in _OWN]
        return shared[-1].key


def prompt_parts(record: Record) -> list[tuple[str, str]]:
    """The record's prompt as ``(kind, text)`` parts in prompt order; the context is cut after each document."""
    if record.prompt is None:
        return [("inputs", json.dumps(record.inputs, sort_keys=True, default=str))]
    parts: list[tuple[str, str]] = []
    for seg in record.prompt.segments:
        if seg.kind == SegmentKind.context and seg.spans:
            start = 0
            for _, end in seg.spans:
                parts.append(("context", seg.text[start:end]))
                start = end
            if start < len(seg.text):
                parts.append(("context", seg.text[start:]))
        else:
            parts.append((seg.kind.value, seg.text))
    return parts


def prefix_chain(record: Record, mode: str) -> list[Level]:
    """The nested prefixes of ``record``'s prompt under render ``mode`` (model, backend, chat), most shared first."""
    h = hashlib.blake2b(mode.encode(), digest_size=8)
    chain = [Level(h.hexdigest(), 0, "mode")]
    for kind, text in prompt_parts(record):
        h.update(b"\0" + kind.encode() + b"\0" + text.encode())
        chain.append(Level(h.hexdigest(), estimate_tokens(text) + 1, kind))
    return chain


def render_mode(stages: Sequence[Any]) -> str:
    """What decides how a prompt becomes tokens: the first LM stage's model, backend and chat setting."""
    for s in stages:
        if hasattr(s, "lm") and hasattr(s, "model"):
            return f"{s.model}|{getattr(s, 'backend', '')}|chat={getattr(s, 'chat', None)}"
    return "no-lm"


def extra_cost(stages: Sequence[Any]) -> float:
    """Per-item cost of the first LM stage beyond its prompt: label tokens scored, or tokens generated."""
    for s in stages:
        labels = getattr(s, "labels", None)
        if labels and hasattr(s, "words"):
            return float(sum(estimate_tokens(w) + 1 for w in s.words()))
        if hasattr(s, "max_tokens") and hasattr(s, "lm"):
            return DECODE_WEIGHT * float(s.max_tokens or 64)
    return 0.0


# -- the prefix tree -----------------------------------------------------------------------
@dataclass
class Node:
    key: str
    tokens: int
    depth: int
    parent: Node | None = None
    children: dict[str, Node] = field(default_factory=dict)
    items: list[int] = field(default_factory=list)  # items whose whole chain ends here

    def path(self) -> list[Node]:
        """This node and its ancestors, root last."""
        out, node = [], self
        while node is not None:
            out.append(node)
            node = node.parent
        return out


def build_tree(items: Sequence[Item]) -> Node:
    """The prefix tree of the items' chains (the root is the empty prefix)."""
    root = Node("", 0, 0)
    for i, item in enumerate(items):
        node = root
        for level in item.chain:
            child = node.children.get(level.key)
            if child is None:
                child = node.children[level.key] = Node(level.key, level.tokens, node.depth + 1, node)
            node = child
        node.items.append(i)
    return root


@dataclass
class Group:
    """Items of one subtree, placed together: ``anchor`` is the deepest node all of them share."""

    anchor: Node
    items: list[int]
    private: float  # tokens below the anchor (each node once) plus the items' extra cost

    def path_tokens(self, held: set[str] | None = None) -> int:
        """Tokens of the anchor and its ancestors, less those ``held`` already."""
        return sum(n.tokens for n in self.anchor.path() if not held or n.key not in held)

    @property
    def cost(self) -> float:
        return self.private + self.path_tokens()


def _private_cost(anchor: Node, items: Sequence[int], all_items: Sequence[Item]) -> float:
    seen: set[str] = set()
    cost = 0.0
    for i in items:
        item = all_items[i]
        cost += item.extra
        for level in item.chain[anchor.depth:]:
            if level.key not in seen:
                seen.add(level.key)
                cost += level.tokens
    return cost


def _group(anchor: Node, items: list[int], all_items: Sequence[Item]) -> Group:
    return Group(anchor, items, _private_cost(anchor, items, all_items))


def _split(group: Group, all_items: Sequence[Item]) -> list[Group]:
    """The group cut at its first branching below the anchor (or its identical items halved)."""
    anchor, members = group.anchor, set(group.items)
    while True:
        by_child: dict[str, list[int]] = {}
        for i in group.items:
            chain = all_items[i].chain
            if len(chain) > anchor.depth:
                by_child.setdefault(chain[anchor.depth].key, []).append(i)
        here = [i for i in anchor.items if i in members]
        if len(by_child) == 1 and not here:
            anchor = anchor.children[next(iter(by_child))]
            continue
        break
    parts = [_group(anchor.children[k], v, all_items) for k, v in by_child.items()]
    if here:
        if parts or len(here) == 1:
            parts.append(_group(anchor, here, all_items))
        else:
            half = len(here) // 2
            parts += [_group(anchor, here[:half], all_items), _group(anchor, here[half:], all_items)]
    return parts


def cut_groups(items: Sequence[Item], workers: int) -> list[Group]:
    """Groups of whole subtrees, each at most a worker's fair share of the cost where it can be split."""
    if not items:
        return []
    whole = _group(build_tree(items), list(range(len(items))), items)
    target = whole.cost / max(1, workers)
    count = itertools.count()
    heap = [(-whole.cost, next(count), whole)]
    while heap:
        _, _, big = heap[0]
        if big.cost <= target or len(big.items) < 2:
            break
        heapq.heappop(heap)
        for part in _split(big, items):
            heapq.heappush(heap, (-part.cost, next(count), part))
    return [g for _, _, g in sorted(heap, key=lambda e: e[1])]


# -- what each worker holds ------------------------------------------------------------------
class HeldPrefixes:
    """The prefixes a worker's engine is believed to hold: least recently used first out past ``capacity`` tokens."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[str, int] = OrderedDict()
        self._tokens = 0

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def keys(self) -> set[str]:
        return set(self._keys)

    def add(self, key: str, tokens: int) -> None:
        if key in self._keys:
            self._keys.move_to_end(key)
            return
        self._keys[key] = tokens
        self._tokens += tokens
        while self._tokens > self.capacity and len(self._keys) > 1:
            _, dropped = self._keys.popitem(last=False)
            self._tokens -= dropped

    def clear(self) -> None:
        self._keys.clear()
        self._tokens = 0


def group_nodes(group: Group, items: Sequence[Item]) -> list[Level]:
    """Every prefix the group's items bring to a worker (path and subtree), each once, in tree order."""
    out: dict[str, Level] = {}
    for n in reversed(group.anchor.path()):
        out.setdefault(n.key, Level(n.key, n.tokens))
    for i in group.items:
        for level in items[i].chain:
            out.setdefault(level.key, level)
    return list(out.values())


# -- placement -----------------------------------------------------------------------------------
@dataclass
class Task:
    """Items sent to one worker in one call, grouped by job: ``{job: [record index, ...]}``."""

    id: int
    worker: int | None
    parts: dict[int, list[int]]
    groups: frozenset[int]
    cost: float
    attempts: int = 0

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.parts.values())


@dataclass
class Plan:
    """Where every item runs: tasks per worker (or one shared queue), and the estimated cost per worker."""

    tasks: list[Task]
    groups: list[Group]
    load: list[float]  # estimated cost per worker (prefill tokens and extras)
    placement: str

    def prefill_estimate(self) -> float:
        return sum(self.load)


def _tree_order(group: Group, items: Sequence[Item]) -> tuple[str, ...]:
    return tuple(level.key for level in items[group.items[0]].chain)


def _tasks(groups: Sequence[tuple[int, Group]], items: Sequence[Item], worker: int | None, max_items: int,
           next_id: int) -> list[Task]:
    """Consecutive groups cut into tasks of at most ``max_items`` items."""
    tasks: list[Task] = []
    parts: dict[int, list[int]] = {}
    members: set[int] = set()
    cost, size = 0.0, 0
    for gid, g in groups:
        order = sorted(g.items, key=lambda i: tuple(level.key for level in items[i].chain))
        share = g.private / max(1, len(order))
        for i in order:
            if size == max_items:
                tasks.append(Task(next_id + len(tasks), worker, parts, frozenset(members), cost))
                parts, members, cost, size = {}, set(), 0.0, 0
            parts.setdefault(items[i].job, []).append(items[i].index)
            members.add(gid)
            cost += share
            size += 1
    if size:
        tasks.append(Task(next_id + len(tasks), worker, parts, frozenset(members), cost))
    return tasks


def place_affinity(items: Sequence[Item], held: list[HeldPrefixes], max_items: int = 32) -> Plan:
    """Groups to workers, largest first, each where it adds the least to the longest load (held prefixes are free)."""
    workers = len(held)
    groups = cut_groups(items, workers)
    load = [0.0] * workers
    keys = [h.keys() for h in held]
    largest_first = sorted(range(len(groups)), key=lambda n: (-groups[n].cost, _tree_order(groups[n], items)))
    owner: dict[int, int] = {}
    for n in largest_first:
        g = groups[n]
        costs = [load[w] + g.private + g.path_tokens(keys[w]) for w in range(workers)]
        w = min(range(workers), key=lambda w: (costs[w], w))
        load[w] = costs[w]
        keys[w].update(level.key for level in group_nodes(g, items))
        owner[n] = w
    in_tree_order = sorted(range(len(groups)), key=lambda n: _tree_order(groups[n], items))
    tasks: list[Task] = []
    for w in range(workers):
        mine = [(n, groups[n]) for n in in_tree_order if owner[n] == w]
        tasks += _tasks(mine, items, w, max_items, len(tasks))
    return Plan(tasks, groups, load, "affinity")


def prompt_units(items: Sequence[Item]) -> list[Group]:
    """The units: items whose prompts share everything before the question (one head), in tree order."""
    root = build_tree(items)
    by_head: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_head.setdefault(item.head, []).append(i)
    nodes = {}
    for members in by_head.values():
        node = root
        head = items[members[0]].head
        for level in items[members[0]].chain:
            node = node.children[level.key]
            if level.key == head:
                break
        nodes[head] = node
    groups = [_group(nodes[h], m, items) for h, m in by_head.items()]
    return sorted(groups, key=lambda g: _tree_order(g, items))


def place_round_robin(items: Sequence[Item], workers: int, max_items: int = 32, start: int = 0) -> Plan:
    """The same units dealt to the workers in turn, whole, from worker ``start``: blind to what each
    worker holds and to prefixes units share (the baseline)."""
    groups = prompt_units(items)
    load = [0.0] * workers
    mine: list[list[tuple[int, Group]]] = [[] for _ in range(workers)]
    for n, g in enumerate(groups):
        w = (start + n) % workers
        mine[w].append((n, g))
        load[w] += g.cost
    tasks: list[Task] = []
    for w in range(workers):
        tasks += _tasks(mine[w], items, w, max_items, len(tasks))
    return Plan(tasks, groups, load, "round_robin")


def estimate_prefill(plan: Plan, items: Sequence[Item], workers: int) -> list[float]:
    """Estimated prefill tokens per worker when the plan's tasks run where it puts them."""
    by_index = {(it.job, it.index): it for it in items}
    seen: list[set[str]] = [set() for _ in range(workers)]
    out = [0.0] * workers
    for task in plan.tasks:
        w = task.worker or 0
        for job, idx in task.parts.items():
            for i in idx:
                item = by_index[(job, i)]
                out[w] += item.extra
                for level in item.chain:
                    if level.key not in seen[w]:
                        seen[w].add(level.key)
                        out[w] += level.tokens
    return out
