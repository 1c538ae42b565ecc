"""A unit's host update in one pass over memory: add the arriving gradient, step, write what the next forward streams.

Done as separate passes over a whole layer (add the last micro-batch's gradient, run the optimizer,
re-cast the compute copy; under ``"lean"`` also widen and narrow the optimizer state) the host step
reads and writes each byte of a layer several times from memory. Here a unit goes through in chunks
of ``CHUNK`` elements that stay in a core's cache: for each chunk the arriving gradient is added into
the fp32 ``.grad``, lean state is widened, torch's fused kernel steps the chunk, lean state is rounded
back and the compute-dtype copy is written, before the next chunk is read.

Exact, bit for bit: torch's fused CPU Adam/AdamW/SGD kernels are elementwise, with Adam's bias
correction computed per parameter from its step count, which is advanced once per parameter before
its first chunk (as ``torch.optim.adam._fused_adam`` advances it once per call). Chunks cut a
parameter only at multiples of ``ALIGN`` elements from its start, so each element takes the same
vector or scalar-tail path as in one call over the whole parameter (the kernel splits its work
between threads on 64-byte lines too). Everything this does not cover steps whole parameters through
the optimizer's own ``step`` as before, with the cast after it: other optimizers (per-tensor norms,
subclasses that override ``step``), the first step (state not created yet), step hooks, a closure,
gradient scaling, non-contiguous tensors.

Hand-written because torch has no fused "accumulate + step + cast" kernel: the chunks call torch's
own fused kernels (``torch._fused_adam_``, ``torch._fused_adamw_``, ``torch._fused_sgd_``, private ops)
with the arguments ``torch.optim`` passes them; tests/test_one_pass.py holds the result bitwise
against ``optimizer.step`` over whole parameters.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from .state import HELD_DTYPE
from .stepper import step_unit
from .units import Entry, Unit

# Off by default: measured slower than stepping whole parameters on the 2-core CI machine
# (benchmarks/RESULTS.md, "Host update per step": the many small kernel calls each pay the worker's
# thread-pool synchronisation); kept, and held bitwise by tests/test_one_pass.py, to be measured on a
# many-core host before it is turned on. Without it a unit's update still adds the arriving gradient,
# steps and re-casts in one task, over whole parameters.
USE_CHUNKS = False
CHUNK = 1 << 16  # elements per chunk: its fp32 parameter, gradient and two moments are 1 MiB, in a core's L2
ALIGN = 64  # a parameter is cut only at multiples of this many elements from its start (vector width x 4)
_local = threading.local()  # per-thread scratch: the widened gradient and lean state of one chunk


def _scratch(i: int, numel: int) -> torch.Tensor:
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(i)
    if buf is None or buf.numel() < numel:
        buf = bufs[i] = torch.empty(max(numel, CHUNK), dtype=torch.float32)
    return buf[:numel]


def chunks(numels: Sequence[int], chunk: int = CHUNK) -> Iterator[list[tuple[int, int, int]]]:
    """Pieces ``(index, a, b)`` of tensors of ``numels`` elements, at most ``chunk`` elements per chunk,
    in order; a tensor is cut only at multiples of ``ALIGN`` from its start."""
    assert chunk % ALIGN == 0
    piece: list[tuple[int, int, int]] = []
    room = chunk
    for i, n in enumerate(numels):
        a = 0
        while a < n:
            take = n - a
            if take > room:
                take = room // ALIGN * ALIGN
                if take == 0:
                    yield piece
                    piece, room = [], chunk
                    continue
            piece.append((i, a, a + take))
            a += take
            room -= take
            if room == 0:
                yield piece
                piece, room = [], chunk
    if piece:
        yield piece


def _hooked(optimizer: Optimizer) -> bool:
    from torch.optim import optimizer as opt_mod

    return bool(optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or opt_mod._global_optimizer_pre_hooks or opt_mod._global_optimizer_post_hooks)


def _flat(t: torch.Tensor | None, dtypes: tuple[torch.dtype, ...], shape: torch.Size) -> torch.Tensor | None:
    if t is None or t.dtype not in dtypes or t.shape != shape or not t.is_contiguous() or t.is_sparse or t.device.type != "cpu":
        return None
    return t.detach().view(-1)


class _Kernel:
    """One param group's fused kernel over chunk views: its per-parameter tensors and the call."""

    state_keys: tuple[str, ...] = ()

    def __init__(self, optimizer: Optimizer, hp: dict[str, Any], lean: bool) -> None:
        self.optimizer, self.hp, self.lean = optimizer, hp, lean
        self.states: list[list[torch.Tensor]] = []  # per state key: each parameter's flat tensor

    def gather(self, params: list[torch.Tensor]) -> bool:
        """Collect each parameter's state; False where a tensor is missing or not a plain flat fp32 one."""
        held = (torch.float32, HELD_DTYPE) if self.lean else (torch.float32,)
        self.states = [[] for _ in self.state_keys]
        for p in params:
            state = self.optimizer.state.get(p)
            if not state:
                return False
            for k, key in enumerate(self.state_keys):
                flat = _flat(state.get(key), held, p.shape)
                if flat is None:
                    return False
                self.states[k].append(flat)
        return True

    def begin(self, params: list[torch.Tensor]) -> None:
        """Once per step, before any chunk."""

    def __call__(self, ps: list[torch.Tensor], gs: list[torch.Tensor], st: list[list[torch.Tensor]], idx: list[int]) -> None:
        raise NotImplementedError


class _Adam(_Kernel):
    """``torch.optim.adam._fused_adam`` (Adam and AdamW) on chunk views."""

    def __init__(self, optimizer: Optimizer, hp: dict[str, Any], lean: bool) -> None:
        super().__init__(optimizer, hp, lean)
        self.state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if hp["amsgrad"] else ("exp_avg", "exp_avg_sq")
        from torch.optim.optimizer import _to_scalar

        self.beta1, self.beta2 = (_to_scalar(b) for b in hp["betas"])
        self.func = torch._fused_adamw_ if hp.get("decoupled_weight_decay") else torch._fused_adam_
        self.steps: list[torch.Tensor] = []

    def gather(self, params: list[torch.Tensor]) -> bool:
        if not super().gather(params):
            return False
        steps = [self.optimizer.state[p].get("step") for p in params]
        if not all(isinstance(s, torch.Tensor) and s.dim() == 0 and s.dtype == torch.float32 and s.device.type == "cpu" for s in steps):
            return False
        self.steps = steps  # type: ignore[assignment]
        return True

    def begin(self, params: list[torch.Tensor]) -> None:
        torch._foreach_add_(self.steps, 1)

    def __call__(self, ps: list[torch.Tensor], gs: list[torch.Tensor], st: list[list[torch.Tensor]], idx: list[int]) -> None:
        hp = self.hp
        max_sqs = st[2] if hp["amsgrad"] else []
        self.func(ps, gs, st[0], st[1], max_sqs, [self.steps[i] for i in idx], amsgrad=hp["amsgrad"], lr=hp["lr"],
                  beta1=self.beta1, beta2=self.beta2, weight_decay=hp["weight_decay"], eps=hp["eps"], maximize=hp["maximize"],
                  grad_scale=None, found_inf=None)


class _SGD(_Kernel):
    """``torch.optim.sgd._fused_sgd`` on chunk views, once its momentum buffers exist."""

    def __init__(self, optimizer: Optimizer, hp: dict[str, Any], lean: bool) -> None:
        super().__init__(optimizer, hp, lean)
        self.state_keys = ("momentum_buffer",) if hp["momentum"] != 0 else ()

    def gather(self, params: list[torch.Tensor]) -> bool:
        if not self.state_keys:
            self.states = []
            return True
        return super().gather(params)

    def __call__(self, ps: list[torch.Tensor], gs: list[torch.Tensor], st: list[list[torch.Tensor]], idx: list[int]) -> None:
        hp = self.hp
        torch._fused_sgd_(ps, gs, st[0] if st else [], weight_decay=hp["weight_decay"], momentum=hp["momentum"], lr=hp["lr"],
                          dampening=hp["dampening"], nesterov=hp["nesterov"], maximize=hp["maximize"], is_first_step=False,
                          grad_scale=None, found_inf=None)


def kernel_for(optimizer: Optimizer, hp: dict[str, Any], kwargs: dict[str, Any], lean: bool) -> _Kernel | None:
    """The chunked kernel for one param group, or None where the optimizer's own ``step`` must run."""
    base = type(optimizer).__dict__.get("_megatrain_base", type(optimizer))
    if not USE_CHUNKS or kwargs or not hp.get("fused") or hp.get("differentiable") or hp.get("capturable") or _hooked(optimizer):
        return None
    if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        return None
    if base in (torch.optim.Adam, torch.optim.AdamW):
        return _Adam(optimizer, hp, lean)
    if base is torch.optim.SGD:
        return _SGD(optimizer, hp, lean)
    return None


def _add(dst: torch.Tensor, src: torch.Tensor, first: bool) -> None:
    """``dst += src`` (``first``: ``dst = src``) for a chunk, widening ``src`` in a scratch that stays in cache."""
    if first:
        dst.copy_(src)
    elif src.dtype == dst.dtype:
        dst.add_(src)
    else:
        wide = _scratch(-1, src.numel())
        wide.copy_(src)
        dst.add_(wide)


def _take_gradients(unit: Unit, arriving: torch.Tensor | None, produced: Sequence[bool] | None) -> dict[int, bool]:
    """Which entries' arriving gradient the pass adds (``id(entry) -> first``), with ``Unit.accumulate``'s
    semantics: a ``.grad`` that is None becomes the arena view (filled in the pass), one that got no
    gradient stays None. A ``.grad`` the user replaced by another tensor is added here, whole."""
    out: dict[int, bool] = {}
    if arriving is None:
        return out
    trainable = [e for e in unit.entries if e.goffset is not None]
    assert produced is not None and len(produced) == len(trainable)
    for e, ok in zip(trainable, produced):
        if not ok:
            continue
        grad, view = e.param.grad, unit.grad_view(e)
        if grad is None:
            e.param.grad = view
            out[id(e)] = True
        elif grad.data_ptr() == view.data_ptr() and grad.dtype == view.dtype and grad.is_contiguous():
            out[id(e)] = False
        else:
            _add_whole(unit, e, arriving, False, grad)
    return out


def _add_whole(unit: Unit, e: Entry, arriving: torch.Tensor, first: bool, grad: torch.Tensor | None = None) -> None:
    assert e.goffset is not None
    src = arriving[e.goffset : e.goffset + e.numel]
    dst = unit.grad_view(e) if grad is None else grad
    if dst.is_contiguous():
        for (_, a, b), in chunks([e.numel]):
            _add(dst.view(-1)[a:b], src[a:b], first)
    else:
        dst.add_(src.view(e.shape))


def update_unit(
    unit: Unit, optimizer: Optimizer, hparams: list[dict[str, Any]], params: list[list[torch.Tensor]], kwargs: dict[str, Any],
    lean: Any, arriving: torch.Tensor | None = None, produced: Sequence[bool] | None = None,
) -> None:
    """Add ``arriving`` (the unit's packed gradients of the last micro-batch, ``produced`` per trainable
    entry as in ``Unit.accumulate``; None: the gradients are complete), step ``params`` (per group, with
    the snapshot ``hparams``) and write the unit's streamed copy, chunk by chunk where a fused kernel
    covers the group (on the host worker)."""
    entry_of = {id(e.param): e for e in unit.entries}
    adding = _take_gradients(unit, arriving, produced)
    cast_done: set[int] = set()
    rest_hp: list[dict[str, Any]] = []
    rest: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for hp, ps in zip(hparams, params):
            ps = [p for p in ps if p.grad is not None]
            kernel = kernel_for(optimizer, hp, kwargs, lean is not None) if ps else None
            entries = [entry_of.get(id(p)) for p in ps]
            grads = [_flat(p.grad, (torch.float32,), p.shape) for p in ps]
            if kernel is None or None in entries or None in grads or not kernel.gather(ps) or any(p.dtype != torch.float32 for p in ps):
                rest_hp.append(hp)
                rest.append(ps)
                continue
            _chunked(unit, kernel, ps, entries, grads, adding, arriving, cast_done)  # type: ignore[arg-type]
        for ps in rest:  # the optimizer's own step over whole parameters, their gradients complete first
            for p in ps:
                e = entry_of.get(id(p))
                if e is not None and id(e) in adding:
                    _add_whole(unit, e, arriving, adding.pop(id(e)))  # type: ignore[arg-type]
        if any(rest):
            if lean is None:
                step_unit(optimizer, rest_hp, rest, kwargs)
            else:
                for piece in lean.chunks(rest):
                    with lean.widened(optimizer, [p for ps in piece for p in ps]):
                        step_unit(optimizer, rest_hp, piece, kwargs)
        for e in unit.entries:  # gradients of parameters no group stepped
            if id(e) in adding:
                _add_whole(unit, e, arriving, adding.pop(id(e)))  # type: ignore[arg-type]
        # fused optimizers update in place without bumping tensor versions: re-cast what was not cast above
        unit.refresh_compute(force=True, done=cast_done)


def _chunked(unit: Unit, kernel: _Kernel, ps: list[torch.Tensor], entries: list[Entry], grads: list[torch.Tensor],
             adding: dict[int, bool], arriving: torch.Tensor | None, cast_done: set[int]) -> None:
    masters = [unit.store_view(e).view(-1) for e in entries]
    images = [unit.param_view(unit.compute, e).view(-1) if e.soffset is not None else None for e in entries]
    firsts = [adding.pop(id(e), None) for e in entries]
    kernel.begin(ps)
    for piece in chunks([p.numel() for p in ps]):
        idx = [i for i, _, _ in piece]
        for i, a, b in piece:
            if firsts[i] is not None:
                e = entries[i]
                _add(grads[i][a:b], arriving[e.goffset + a : e.goffset + b], firsts[i])  # type: ignore[index, operator]
        states: list[list[torch.Tensor]] = []
        narrowed: list[tuple[torch.Tensor, torch.Tensor]] = []
        offsets, total = [], 0
        for _, a, b in piece:
            offsets.append(total)
            total += b - a
        for k, per_param in enumerate(kernel.states):
            views = []
            for (i, a, b), o in zip(piece, offsets):
                t = per_param[i][a:b]
                if t.dtype != torch.float32:  # lean: held in bf16, widened for the kernel, rounded back after
                    wide = _scratch(k, total)[o : o + b - a]
                    wide.copy_(t)
                    narrowed.append((t, wide))
                    t = wide
                views.append(t)
            states.append(views)
        kernel([masters[i][a:b] for i, a, b in piece], [grads[i][a:b] for i, a, b in piece], states, idx)
        for narrow, wide in narrowed:
            narrow.copy_(wide)  # round to nearest even, as LeanState does
        for i, a, b in piece:
            image = images[i]
            if image is not None:
                image[a:b].copy_(masters[i][a:b])
    cast_done.update(id(e) for e in entries)
