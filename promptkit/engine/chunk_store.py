"""The chunk store: KV of documents computed alone, reused wherever they land in a prompt.

Beside the radix tree (which reuses *prefixes*), the store keeps the KV of a
chunk of tokens (a retrieved document) encoded once after a fixed lead-in,
keyed by a hash of the lead-in and the chunk's token ids. Its entries own runs
of slots in the one KV pool, so the budget bounds them with everything else;
they are evicted least recently used first, on the same clock as the tree's
leaves, when the pool needs room. Entries in use by an assembly are pinned.

A store can be saved next to a retrieval index (safetensors, never pickle)
with the model's identity and the lead-in; loading checks both and refuses
stale KV.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .families import text_config
from .kv_pool import KVPool, Run, run_slots

FORMAT = "promptkit-chunk-kv/1"


class StaleKVError(ValueError):
    """A saved chunk store made for another model, tokenizer or lead-in, or corrupt."""


def chunk_key(lead_in: Sequence[int], tokens: Sequence[int]) -> bytes:
    """Hash of a chunk's token ids and of the lead-in it was encoded after."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(lead_in, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


@dataclass(eq=False)
class Chunk:
    """One stored chunk: its tokens' KV in ``runs``, encoded at positions ``base ..``."""

    key: bytes
    tokens: tuple[int, ...]
    runs: list[Run]
    base: int  # position of the chunk's first token when it was encoded (the lead-in's length)
    lead: bytes = b""  # hash of the lead-in alone (which entries a saved store holds)
    last_access: int = 0
    pins: int = 0

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class ChunkStats:
    hits: int = 0
    misses: int = 0
    stored_tokens: int = 0  # chunk tokens encoded alone (the one-time cost)
    evictions: int = 0


@dataclass
class ChunkStore:
    """Chunk KV in pool slots, LRU-evicted. ``tick`` is the clock the prefix tree uses too."""

    pool: KVPool
    tick: Callable[[], int]
    lead_in: tuple[int, ...] | None = None  # fixed lead-in of a loaded store (None: each prompt's own)
    stats: ChunkStats = field(default_factory=ChunkStats)

    def __post_init__(self) -> None:
        self._entries: OrderedDict[bytes, Chunk] = OrderedDict()  # least recently used first
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> Chunk | None:
        """The chunk stored under ``key`` (counted as a hit or a miss), marked as just used."""
        chunk = self._entries.get(key)
        if chunk is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self._touch(chunk)
        return chunk

    def add(self, key: bytes, tokens: Sequence[int], runs: list[Run], base: int, lead: bytes = b"") -> Chunk:
        """Store a chunk whose KV sits in ``runs`` (the store owns them from now on)."""
        assert sum(n for _, n in runs) == len(tokens)
        old = self._entries.pop(key, None)
        if old is not None:
            self._drop(old)
        chunk = Chunk(key=key, tokens=tuple(tokens), runs=list(runs), base=base, lead=lead)
        self._entries[key] = chunk
        self.tokens += chunk.length
        self._touch(chunk)
        return chunk

    def _touch(self, chunk: Chunk) -> None:
        chunk.last_access = self.tick()
        self._entries.move_to_end(chunk.key)

    def pin(self, chunk: Chunk) -> None:
        chunk.pins += 1

    def unpin(self, chunk: Chunk) -> None:
        assert chunk.pins > 0, "unpin without pin"
        chunk.pins -= 1

    def kv(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's KV ``[layers, 2, kv_heads, n, head_dim]`` (a copy unless it is one run)."""
        if len(chunk.runs) == 1:
            return self.pool.view(chunk.runs[0])
        return self.pool.kv[:, :, :, run_slots(chunk.runs, self.pool.kv.device)]

    # -- eviction ----------------------------------------------------------------------
    def oldest(self) -> int | None:
        """Last access of the least recently used unpinned chunk (None when there is none)."""
        return next((c.last_access for c in self._entries.values() if not c.pins), None)

    def evict(self, tokens: int) -> int:
        """Free at least ``tokens`` slots from unpinned chunks, least recently used first."""
        freed = 0
        for chunk in [c for c in self._entries.values() if not c.pins]:
            if freed >= tokens:
                break
            del self._entries[chunk.key]
            self._drop(chunk)
            freed += chunk.length
            self.stats.evictions += 1
        return freed

    def _drop(self, chunk: Chunk) -> None:
        self.pool.free(chunk.runs)
        self.tokens -= chunk.length
        chunk.runs = []

    def clear(self) -> None:
        """Drop every unpinned chunk."""
        self.evict(self.tokens + 1)

    def info(self) -> dict[str, int]:
        s = self.stats
        return {"chunks": len(self), "chunk_tokens": self.tokens, "chunk_bytes": self.tokens * self.pool.bytes_per_token,
                "chunk_hits": s.hits, "chunk_misses": s.misses, "chunk_tokens_stored": s.stored_tokens,
                "chunk_evictions": s.evictions}

    # -- persistence ---------------------------------------------------------------------
    def export(self, lead_in: Sequence[int]) -> tuple[torch.Tensor, list[int], list[int]]:
        """The chunks encoded after ``lead_in``: their KV on the CPU ``[layers, 2, kv_heads, n, head_dim]``,
        their token ids end to end, and their lengths."""
        lead = chunk_key(lead_in, [])
        chunks = [c for c in self._entries.values() if c.lead == lead]
        if not chunks:
            return self.pool.kv[:, :, :, :0].cpu(), [], []
        kv = torch.cat([self.kv(c) for c in chunks], dim=3).cpu()
        return kv, [t for c in chunks for t in c.tokens], [c.length for c in chunks]

    def load(self, path: str | Path, identity: dict[str, Any], lead_in: Sequence[int] | None = None,
             make_room: Callable[[int], bool] | None = None) -> int:
        """Read a saved store into the pool; returns the chunks loaded (those that fit the budget).

        Raises :class:`StaleKVError` when it was made for another model (``identity``) or, when
        ``lead_in`` is given, after another lead-in. Afterwards requests without a lead-in of
        their own use the saved one, so they find these chunks.
        """
        meta = read_meta(path)
        if meta.get("format") != FORMAT:
            raise StaleKVError(f"{path} is not a promptkit chunk store ({meta.get('format')!r})")
        if meta["identity"] != identity:
            diff = sorted(k for k in set(identity) | set(meta["identity"])
                          if identity.get(k) != meta["identity"].get(k))
            raise StaleKVError(f"{path} holds KV of another model (differs in: {', '.join(diff)}); rebuild it "
                               "with the model you run")
        saved_lead = tuple(meta["lead_in"])
        if lead_in is not None and tuple(lead_in) != saved_lead:
            raise StaleKVError(f"{path} was encoded after another lead-in (or tokenizer); rebuild it")
        if self.lead_in is not None and self.lead_in != saved_lead:
            raise StaleKVError(f"{path} uses a lead-in other than the store already loaded")
        from safetensors import SafetensorError, safe_open

        lead = chunk_key(saved_lead, [])
        loaded = 0
        try:
            with safe_open(str(path), framework="pt") as f:
                tokens, lengths = f.get_tensor("tokens").tolist(), f.get_tensor("lengths").tolist()
                kv = f.get_slice("kv")  # read chunk by chunk: only what fits the budget is ever in memory
                shape = tuple(kv.get_shape())
                if len(shape) != 5 or not shape[3] == len(tokens) == sum(lengths) or min(lengths, default=1) < 1:
                    raise StaleKVError(_corrupt(path, "its tensors disagree in length"))
                if shape[:3] != tuple(self.pool.kv.shape[:3]) or shape[4] != self.pool.kv.shape[4]:
                    raise StaleKVError(f"{path} has KV of shape {shape}, the pool {tuple(self.pool.kv.shape)}")
                at = 0
                for n in lengths:
                    toks = tokens[at : at + n]
                    if make_room is not None and not make_room(n):
                        break
                    runs = self.pool.alloc(n)
                    if runs is None:
                        break
                    self.pool.kv[:, :, :, run_slots(runs, self.pool.kv.device)] = kv[:, :, :, at : at + n].to(
                        self.pool.kv.device, self.pool.kv.dtype)
                    self.add(chunk_key(saved_lead, toks), toks, runs, base=len(saved_lead), lead=lead)
                    at += n
                    loaded += 1
        except (SafetensorError, OSError, RuntimeError) as e:  # truncated or overwritten after read_meta
            raise StaleKVError(_corrupt(path, e)) from None
        self.lead_in = saved_lead
        return loaded


def write_store(path: str | Path, parts: list[tuple[torch.Tensor, list[int], list[int]]], lead_in: Sequence[int],
                identity: dict[str, Any], extra: dict[str, Any] | None = None) -> int:
    """Save exported chunks (see :meth:`ChunkStore.export`) as one safetensors file; returns how many."""
    from safetensors.torch import save_file

    lengths = [n for _, _, ls in parts for n in ls]
    if not lengths:
        raise ValueError("no stored chunk was encoded after this lead-in: nothing to save")
    meta = {"format": FORMAT, "identity": identity, "lead_in": list(lead_in), **(extra or {})}
    save_file({"kv": torch.cat([kv for kv, _, _ in parts], dim=3).contiguous(),
               "tokens": torch.tensor([t for _, ts, _ in parts for t in ts], dtype=torch.int64),
               "lengths": torch.tensor(lengths, dtype=torch.int64)}, str(path), metadata={"promptkit": json.dumps(meta)})
    return len(lengths)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a saved chunk store (model identity, lead-in, ...), without its tensors."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"no chunk store at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("promptkit")
    except (SafetensorError, OSError) as e:
        raise StaleKVError(_corrupt(path, e)) from None
    if raw is None:
        raise StaleKVError(f"{path} is not a promptkit chunk store")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StaleKVError(_corrupt(path, f"unreadable metadata: {e}")) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("identity"), dict) or not isinstance(
            meta.get("lead_in"), list):
        raise StaleKVError(_corrupt(path, "its metadata lacks the model identity or the lead-in"))
    return meta


def _corrupt(path: str | Path, reason: object) -> str:
    return (f"{path} is corrupt or truncated ({reason}); rebuild it with promptkit index build --kv "
            "(with --force to replace the index)")


def model_identity(model: Any, kv_dtype: torch.dtype) -> dict[str, Any]:
    """The model's architecture and a fingerprint of its weights (a few values of every tensor)."""
    cfg = text_config(model.config)
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:256], flat[-256:]]).float().cpu()
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return {"model_type": getattr(cfg, "model_type", "?"), "layers": cfg.num_hidden_layers,
            "kv_dtype": str(kv_dtype).replace("torch.", ""), "weights": h.hexdigest()[:32]}
