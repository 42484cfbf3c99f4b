"""Single-stream decode as one compiled graph: a step's small operations fused between the matmuls.

A decode step of one request does little arithmetic per operation. On a CPU,
dispatching the norms, rotations, residual adds and attention bookkeeping of
every layer (about 1,600 operations for a 30-layer model) costs as much as
the matmuls themselves. Here the whole step, from the token's embedding
through every layer to the output projection, is traced once by
``torch.compile``: inductor fuses what lies between the matmuls into a few C++
loops, keeps PyTorch's own matmul and attention kernels, and with its C++
wrapper no Python runs between kernels.

The graph reads the request's cached keys and values in place, as two runs of
pool slots (a cached prefix and the request's own slots, or one run cut in
two; the run lengths are dynamic, so the graph is traced once), and attends
to the new token's own key inside the graph; the three partial results merge
by their log-sum-exp. It returns the logits and the new token's keys and
values, which are then written to its slot.

Compiling takes a minute the first time on a small machine (seconds once
inductor's on-disk cache holds the result), so it runs on a thread of its own
started with the engine, and decode runs eagerly until the graph is ready. A
machine without a C++ compiler, or a model the graph cannot trace, keeps the
eager forward (a warning says why). Only bfloat16 activations (the bfloat16,
int8 and int4 weight formats) take this path: float32 keeps the eager forward
that equals transformers bit for bit. A compiled bfloat16 step rounds
differently from an eager one (the fused loops keep float32 between
operations).
"""

from __future__ import annotations

import logging
import threading
import types
from typing import Any

import torch
import torch.nn.functional as F

from .kv_pool import KVPool, Run

log = logging.getLogger("promptkit.engine")

MIN_RUN = 2  # a run this short would be a constant size to the graph (inductor specializes sizes 0 and 1)
_OPTIONS = {"cpp_wrapper": True,  # the step's kernels called from C++, not from generated Python
            "cpp.threads": 1}  # fused loops over a few hundred values: an OpenMP region each would cost more
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _own_code(method: Any) -> Any:
    """``method`` over a copy of its code object. Dynamo keeps compiled graphs per code object, each
    guarded on the instance it was traced for; with one shared code object, every engine in a
    process would add an entry to one list, and the ninth (``recompile_limit``) would fail to
    compile. A copy per engine keeps one entry per code object, freed with the engine."""
    fn = method.__func__
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, method.__self__)


def usable(lean: Any, pool: KVPool) -> bool:
    """Whether a decode graph applies: the lean forward, on CPU, with bfloat16 activations and KV."""
    return (lean is not None and lean.rope_table and pool.kv.device.type == "cpu"
            and pool.kv.dtype == torch.bfloat16 and pool.capacity >= 4 * MIN_RUN)


class CompiledDecode:
    """The decode step of one request as a compiled graph over the lean forward's bound layers.

    :meth:`step` returns None (the caller runs the eager forward) until the graph is compiled,
    or when the request's keys do not fit its shape.
    """

    def __init__(self, lean: Any, pool: KVPool) -> None:
        self.lean, self.pool = lean, pool
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.steps = 0  # decode steps run by the graph
        self._fn: Any = None
        self._hidden = torch.empty(1, lean.model.config.hidden_size, dtype=pool.kv.dtype)
        threading.Thread(target=self._compile, name="promptkit-compile", daemon=True).start()

    def _compile(self) -> None:
        """Trace and compile by running the graph once on real pool views (their strides are part of
        what the graph is specialized to); the outputs are dropped and no slot is written."""
        try:
            self._fn = torch.compile(_own_code(self._graph), fullgraph=True, dynamic=False, options=_OPTIONS)
            with torch.inference_mode():  # as the engine calls it: inference tensors in, or the guards differ
                cos, sin = torch.zeros(2, 1, 1, self.pool.kv.shape[-1], dtype=self.pool.kv.dtype).unbind()
                self._fn(torch.zeros(1, dtype=torch.long), cos.clone(), sin.clone(),
                         *self._views((0, MIN_RUN + 1), (MIN_RUN + 1, MIN_RUN)))
            self.ready.set()
        except Exception as e:  # no compiler, or a model the graph cannot trace: decode stays eager
            self.error = e
            log.warning("single-stream decode stays eager: compiling its graph failed (%s: %s)",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")

    def _views(self, first: Run, second: Run) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool's K/V of two runs, ``[layers, 2, kv_heads, n, head_dim]`` each, with n dynamic."""
        kv = self.pool.kv
        views = kv[:, :, :, first[0] : first[0] + first[1]], kv[:, :, :, second[0] : second[0] + second[1]]
        for v in views:
            torch._dynamo.mark_dynamic(v, 3)
        return views

    @torch.inference_mode()
    def step(self, token: int, position: int, past: list[Run], slot: int) -> torch.Tensor | None:
        """Logits ``[1, V]`` (float32) after ``token`` at ``position``, whose keys are the pool runs
        ``past`` and its own slot ``slot`` (written here); None if the graph is not ready or ``past``
        is not one or two runs of at least :data:`MIN_RUN` slots (the caller runs the eager step)."""
        if not self.ready.is_set():
            return None
        if len(past) == 1 and past[0][1] >= 2 * MIN_RUN:
            (a, n), half = past[0], past[0][1] // 2
            first, second = (a, half), (a + half, n - half)
        elif len(past) == 2 and min(n for _, n in past) >= MIN_RUN:
            first, second = past
        else:
            return None
        cos, sin = self.lean._rope(self._hidden, torch.tensor([[position]]))
        logits, new = self._fn(torch.tensor([token]), cos, sin, *self._views(first, second))
        self.pool.kv[:, :, :, slot].copy_(new)
        self.steps += 1
        return logits.float()

    def _graph(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, first: torch.Tensor,
               second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [1]; cos, sin [1, 1, D] (the lean forward's rotation at the token's position); first,
        second: cached K/V [L, 2, Hkv, n, D]. Returns logits [1, V] and the token's K/V [L, 2, Hkv, D].
        The lean forward's decode arithmetic, with attention over the two runs and the new key."""
        lean = self.lean
        hq, hkv = lean.heads, lean.kv_heads
        h = lean.base.embed_tokens(ids)  # [1, hidden]
        dim = h.shape[-1]
        new = []
        for i, lay in enumerate(lean.layers):
            qkv_mm, o_mm, gate_up_mm, down_mm = lay.small
            x = F.rms_norm(h, (dim,), lay.ln1, lay.eps)
            qkv = qkv_mm(x).view(1, hq + 2 * hkv, 2, -1)  # [1, heads, 2 halves, D / 2]
            qk, v = qkv[:, : hq + hkv], qkv[0, hq + hkv :].flatten(1)
            qk = (qk.flatten(2) * cos + qk.flip(2).flatten(2) * sin)[0]
            q, k = qk[:hq].view(hkv, hq // hkv, -1), qk[hq:]
            out = _attend(q, k, v, first[i], second[i], lay.attn.scaling)
            new.append(torch.stack((k, v)))
            h = h + o_mm(out.reshape(1, -1))
            x = F.rms_norm(h, (dim,), lay.ln2, lay.eps)
            gate, up = gate_up_mm(x).chunk(2, dim=-1)
            h = h + down_mm(F.silu(gate) * up)
        return lean.model.lm_head(lean.base.norm(h)), torch.stack(new)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q [Hkv, g, D] (the query heads of each KV head) over the cached K/V ``first`` and ``second``
    ([2, Hkv, n, D]) and the new key and value k, v [Hkv, D]: [Hkv, g, D]."""
    o1, l1 = _FLASH(q[None], first[0][None], first[1][None], scale=scale)[:2]  # [1, Hkv, g, D], [1, Hkv, g]
    o2, l2 = _FLASH(q[None], second[0][None], second[1][None], scale=scale)[:2]
    s = (q.float() * k.float()[:, None]).sum(-1) * scale  # [Hkv, g]: each query head with its new key
    l1, l2 = l1[0].float(), l2[0].float()
    top = torch.maximum(torch.maximum(l1, l2), s)
    w1, w2, w3 = torch.exp(l1 - top), torch.exp(l2 - top), torch.exp(s - top)
    out = o1[0].float() * w1[..., None] + o2[0].float() * w2[..., None] + v.float()[:, None] * w3[..., None]
    return (out / (w1 + w2 + w3)[..., None]).to(q.dtype)
