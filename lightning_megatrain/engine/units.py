"""A unit is a group of parameters that live in one host arena: one streamed layer, or everything
outside the layers (embeddings, head, norms, raw parameters, tied weights), which is bound on the
device for the whole step.

Module parameters become views into the arena, so ``parameters()``, ``state_dict()`` keys,
optimizers and user code keep working on the same ``Parameter`` objects. How a parameter is held:

- trainable (fp32 only): an fp32 master, an fp32 gradient, optimizer state;
- frozen: stored once, in the dtype it has (a bf16 base costs 2 bytes per parameter), no gradient;
- streamed: each parameter has a copy in the unit's *image*, one contiguous byte buffer laid out as
  the device slot is, so one copy moves a layer. Matrices (``dim >= 2``, what autocast casts for a
  matmul) are streamed in the compute dtype; vectors (norm weights, biases) and anything not fp32 are
  streamed as they are stored, so norms compute with the fp32 weights plain mixed precision uses.
  Where the streamed dtype equals the stored one the image *is* the storage (no second copy).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .host import HostArena, add_widened
from .materialize import Materializer, bind_storage


@dataclass
class Entry:
    """One parameter: where it sits in the flat buffers and every (module, name) that holds it."""

    param: nn.Parameter
    offset: int
    numel: int
    shape: torch.Size
    goffset: int | None  # None: frozen, no gradient space
    refs: list[tuple[nn.Module, str]] = field(default_factory=list)
    name: str = ""
    stream_dtype: torch.dtype | None = None  # dtype of its copy in the unit's image (and device slot)
    boffset: int = 0  # byte offset of that copy in the image
    soffset: int | None = None  # element offset of a separate fp32 copy in ``master``; None: stored in the image


ALIGN = 64  # bytes: every streamed tensor starts on a 64-byte boundary of the image and the slot


ADAPTER_FRACTION = 4  # a layer whose trainable parameters are at most a quarter of it streams them in fp32


def stream_dtypes(params: Sequence[torch.Tensor], trainable: Sequence[bool], compute_dtype: torch.dtype) -> list[torch.dtype]:
    """The dtype each parameter of one unit is streamed and computed in.

    fp32 matrices stream in the compute dtype (as autocast would cast them for a matmul); vectors
    and non-fp32 tensors as they are stored. Trainable parameters that are a small part of their layer
    (adapters such as LoRA on a frozen base) stream in fp32, as plain mixed precision hands them to the
    layer: code that looks at a weight's dtype (PEFT casts the adapter input to it) then computes exactly
    as in plain training, at a transfer cost of a few percent.
    """
    numel = sum(p.numel() for p in params)
    tnumel = sum(p.numel() for p, t in zip(params, trainable) if t)
    adapters = 0 < tnumel * ADAPTER_FRACTION <= numel
    out = []
    for p, t in zip(params, trainable):
        cast = p.dtype == torch.float32 and p.dim() >= 2 and not (t and adapters)
        out.append(compute_dtype if cast else p.dtype)
    return out


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def image_layout(dtypes: Sequence[torch.dtype], numels: Sequence[int]) -> tuple[list[int], int]:
    """Byte offsets of each tensor's streamed copy in a unit image, and the image's size."""
    offsets, total = [], 0
    for dtype, numel in zip(dtypes, numels):
        offsets.append(total)
        total += _align(numel * dtype.itemsize)
    return offsets, total


def collect_entries(modules: list[tuple[str, nn.Module]], exclude: set[int], grads: bool = True) -> list[Entry]:
    """Parameters reachable from ``modules``, each once, in registration order; skip ids in ``exclude``."""
    entries: dict[int, Entry] = {}
    for prefix, root in modules:
        for mod_name, module in root.named_modules(prefix=prefix, remove_duplicate=False):
            for name, p in module._parameters.items():
                if p is None or id(p) in exclude:
                    continue
                e = entries.get(id(p))
                if e is None:
                    e = entries[id(p)] = Entry(p, 0, p.numel(), p.shape, None, name=f"{mod_name}.{name}".lstrip("."))
                if (module, name) not in [(m, n) for m, n in e.refs]:
                    e.refs.append((module, name))
    out = list(entries.values())
    for e in out:
        e.goffset = 0 if e.param.requires_grad and grads else None
    assign_offsets(out)
    return out


def assign_offsets(entries: list[Entry]) -> None:
    """Each entry's element offset in its unit's flat buffers: the masters, and the gradients for the
    entries that have gradient space (``goffset`` not None)."""
    offset = goffset = 0
    for e in entries:
        e.offset = offset
        offset += e.numel
        if e.goffset is not None:
            e.goffset = goffset
            goffset += e.numel


class Unit:
    """Host arena of one group: fp32 masters of cast parameters, fp32 gradients, the streamed image
    (frozen and uncast parameters live there directly), and gradient staging."""

    def __init__(
        self,
        name: str,
        index: int,
        entries: list[Entry],
        compute_dtype: torch.dtype,
        pin: bool,
        staging: bool,
        module: nn.Module | None = None,
        shared: str | None = None,
        fill: bool = True,
        image_bytes: int | None = None,
        materialize: Materializer | None = None,
    ) -> None:
        """``shared``: the node-shared file the arena lives in (data parallel); ``fill=False`` when another
        rank of the node has already filled it (the parameters only become views of it);
        ``image_bytes``: the image padded to whole rank shards; ``materialize``: what fills parameters
        built on the meta device or given by a weights file (``materialize.py``)."""
        self.name = name
        self.module = module
        self.mutates_buffers = False
        self.index = index
        self.entries = entries
        self.numel = sum(e.numel for e in entries)
        self.gnumel = sum(e.numel for e in entries if e.goffset is not None)
        self.compute_dtype = compute_dtype
        self.ticket = 0  # worker ticket of the last host task that updates the masters
        dtypes = stream_dtypes([e.param for e in entries], [e.goffset is not None for e in entries], compute_dtype)
        offsets, nbytes = image_layout(dtypes, [e.numel for e in entries])
        mnumel = 0
        for e, dtype, off in zip(entries, dtypes, offsets):
            e.stream_dtype = dtype
            e.boffset = off
            e.soffset = None
            if e.stream_dtype != e.param.dtype:
                e.soffset = mnumel
                mnumel += e.numel
        self.nbytes = nbytes
        layout = [(mnumel, torch.float32), (self.gnumel, torch.float32), (max(nbytes, image_bytes or 0), torch.uint8)]
        if staging:
            layout.append((self.gnumel, compute_dtype))
        # page-locked: what crosses PCIe, the image (fp32 masters when they are streamed, "compact") and
        # the staging gradients land in; not the fp32 gradients nor masters only the host reads
        self.arena = HostArena(layout, pin=([2, 3] if staging else [2]) if pin else False, shared=shared)
        # data parallel: the element range of each entry this rank owns (id(entry) -> (a, b)); the
        # rank re-casts only those (other ranks write the rest of the shared image)
        self.own: dict[int, tuple[int, int]] | None = None
        bufs = self.arena.buffers
        self.master, self.grad = bufs[0], bufs[1]
        self.compute = bufs[2]  # the image: what one H2D copy puts in a device slot
        self.staging = bufs[3] if staging else None
        self._cast = [e for e in entries if e.soffset is not None]  # stored fp32, streamed in the compute dtype
        with torch.no_grad():
            for e in entries:
                view = self.store_view(e)
                if fill and not (materialize is not None and materialize.fills(e.param)):
                    view.copy_(e.param.data)
                bind_storage(e.param, view)  # the old storage is freed here, one unit at a time
            cast: set[int] = set()
            if fill and materialize is not None:
                cast = materialize.fill(entries, self.store_view, self._cast_view)
        self._synced: dict[int, int] = {}
        self._synced_raw = -1
        if fill:
            self.refresh_compute(done=cast)  # the streamed copies a weights file wrote as it filled the masters
        else:  # the image was cast by the rank that filled it
            self._synced = {id(e): e.param._version for e in self._cast}
            self._synced_raw = self.compute._version

    def store_view(self, e: Entry) -> torch.Tensor:
        """Where the parameter itself lives: its fp32 master, or its own bytes in the image."""
        if e.soffset is not None:
            return self.master[e.soffset : e.soffset + e.numel].view(e.shape)
        return self.param_view(self.compute, e)

    def _cast_view(self, e: Entry) -> torch.Tensor | None:
        """The streamed copy of a parameter stored in fp32 and streamed in the compute dtype, else None."""
        return self.param_view(self.compute, e) if e.soffset is not None else None

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s memory is in this unit's arena (its masters or its image)."""
        for buf in (self.master, self.compute):
            start = buf.data_ptr()
            if buf.numel() and start <= t.data_ptr() < start + buf.numel() * buf.element_size():
                return True
        return False

    def buffers(self) -> list[torch.Tensor]:
        return list(self.module.buffers()) if self.module is not None else []

    def buffer_versions(self) -> list[int]:
        return [b._version for b in self.buffers()]

    @property
    def trainable(self) -> bool:
        return self.gnumel > 0

    def _version(self) -> int:
        """Changes whenever a parameter, its master or the image is written in place (fused optimizers
        do not bump versions: the runtime forces a re-cast after each step)."""
        return self.master._version + self.compute._version + sum(e.param._version for e in self.entries)

    def refresh_compute(self, force: bool = False, done: Collection[int] = ()) -> None:
        """Re-cast the streamed copies of the fp32 masters that changed in place since the last cast.

        A frozen master is cast once (again only if something writes it, e.g. a checkpoint load);
        trainable ones also when the image was written through another view, and all of them with
        ``force`` (after an optimizer step: torch's fused kernels update in place without bumping
        tensor versions). ``done``: ids of entries the caller has just cast (the one-pass host update)."""
        raw = self.compute._version
        with torch.no_grad():
            for e in self._cast:
                version = e.param._version
                if id(e) in done:
                    self._synced[id(e)] = version
                    continue
                fresh = self._synced.get(id(e)) == version and (e.goffset is None or raw == self._synced_raw)
                if fresh and not (force and e.goffset is not None):
                    continue
                if self.own is not None:
                    a, b = self.own.get(id(e), (0, 0))
                    if b > a:
                        self.param_view(self.compute, e).view(-1)[a:b].copy_(self.store_view(e).view(-1)[a:b])
                    self._synced[id(e)] = version
                    continue
                self.param_view(self.compute, e).copy_(self.store_view(e))
                self._synced[id(e)] = version
        self._synced_raw = self.compute._version

    def param_view(self, buf: torch.Tensor, e: Entry) -> torch.Tensor:
        """The parameter's streamed copy in ``buf``: an image-shaped byte buffer (host image or device
        slot), or a flat buffer of one dtype indexed by element offsets."""
        if buf.dtype == torch.uint8:
            assert e.stream_dtype is not None
            size = e.stream_dtype.itemsize
            return buf[e.boffset : e.boffset + e.numel * size].view(e.stream_dtype).view(e.shape)
        return buf[e.offset : e.offset + e.numel].view(e.shape)

    def grad_view(self, e: Entry) -> torch.Tensor:
        assert e.goffset is not None
        return self.grad[e.goffset : e.goffset + e.numel].view(e.shape)

    def accumulate(self, src: torch.Tensor, produced: list[bool]) -> None:
        """Add packed gradients into the fp32 host ``.grad`` with autograd's semantics.

        A parameter whose ``.grad`` is None gets its arena view, filled with the new gradient; one that
        got no gradient keeps None (an optimizer then skips it, as in plain training).
        """
        trainable = [e for e in self.entries if e.goffset is not None]
        if all(produced):
            if all(e.param.grad is None for e in trainable):
                self.grad.copy_(src)
                for e in trainable:
                    e.param.grad = self.grad_view(e)
                return
            if all(e.param.grad is not None and e.param.grad.data_ptr() == self.grad_view(e).data_ptr() for e in trainable):
                add_widened(self.grad, src)
                return
        for e, ok in zip(trainable, produced):
            if not ok:
                continue
            g = src[e.goffset : e.goffset + e.numel].view(e.shape)
            if e.param.grad is None:
                view = self.grad_view(e)
                view.copy_(g)
                e.param.grad = view
            elif e.param.grad.is_contiguous():
                add_widened(e.param.grad, g)
            else:
                e.param.grad.add_(g)

    def accumulate_owned(self, src: torch.Tensor, g_lo: int) -> None:
        """Data parallel: add this rank's gradient elements ``[g_lo, g_lo + src.numel())`` (of the unit's
        trainable elements) into the shared fp32 gradient. A parameter whose ``.grad`` is None gets the
        whole shared view (the other ranks fill their parts); the first gradient after ``zero_grad``
        is copied, later ones added, as autograd does."""
        assert self.own is not None
        for e in self.entries:
            if e.goffset is None:
                continue
            a, b = self.own.get(id(e), (0, 0))
            first = e.param.grad is None
            if first:
                e.param.grad = self.grad_view(e)  # also where another rank owns every element
            if b <= a:
                continue
            g = src[e.goffset + a - g_lo : e.goffset + b - g_lo]
            if first:
                self.grad_view(e).view(-1)[a:b].copy_(g)
            else:
                add_widened(e.param.grad.view(-1)[a:b], g)

    def bind(self, tensors: Sequence[torch.Tensor]) -> None:
        for e, t in zip(self.entries, tensors):
            for module, name in e.refs:
                module._parameters[name] = t  # type: ignore[assignment]

    def unbind(self) -> None:
        for e in self.entries:
            for module, name in e.refs:
                module._parameters[name] = e.param

    def detach(self) -> None:
        """Give every parameter (and gradient) back its own ordinary memory and free the arena."""
        if self.own is not None:
            # node-shared memory: the parameters keep viewing it (a private copy on every rank would
            # need the node's memory N times over); it is freed with the last view
            self.master = self.grad = self.compute = self.staging = None  # type: ignore[assignment]
            self.arena.release()
            return
        with torch.no_grad():
            for e in self.entries:
                grad = e.param.grad
                e.param.data = e.param.data.clone()
                if grad is not None and e.goffset is not None and grad.data_ptr() == self.grad_view(e).data_ptr():
                    e.param.grad = grad.clone()
        self.master = self.grad = self.compute = self.staging = None  # type: ignore[assignment]
        self.arena.release()
