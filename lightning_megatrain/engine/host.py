"""Page-aligned, exact-size host arenas, pinned with ``cudaHostRegister`` when a GPU is used.

torch's caching pinned allocator has rounded requests up to a power of two (pytorch#95823), which
can double the host memory of a large model. We allocate ordinary pageable memory of the exact
size, align it to a page, and page-lock that range ourselves.
"""

from __future__ import annotations

import mmap
import threading
import warnings
from collections.abc import Sequence

import torch

PAGE = mmap.PAGESIZE


def _align(nbytes: int, to: int = PAGE) -> int:
    return (nbytes + to - 1) // to * to


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class HostArena:
    """One host allocation holding several flat typed buffers, each starting on a page boundary."""

    def __init__(self, layout: Sequence[tuple[int, torch.dtype]], pin: bool, shared: str | None = None) -> None:
        offsets, total = [], 0
        for numel, dtype in layout:
            offsets.append(total)
            total += _align(numel * _dtype_size(dtype))
        self.nbytes = total
        if shared is not None:
            # a file in node-shared memory that every rank of the node maps (data parallel): created
            # zero-filled by the first rank to open it; mappings start on a page
            raw = torch.from_file(shared, shared=True, size=max(total, 1), dtype=torch.uint8)
        else:
            raw = torch.empty(total + PAGE, dtype=torch.uint8)
        start = (-raw.data_ptr()) % PAGE
        self._raw: torch.Tensor | None = raw
        base = raw[start : start + total]
        # Each buffer is a tensor of its own on the arena's storage, not a view of one base tensor, so
        # it has its own version counter: adding gradients does not make the masters look changed (which
        # would re-cast a layer's compute copy on every micro-batch).
        storage = raw.untyped_storage()
        self.buffers: list[torch.Tensor] = []
        for off, (numel, dtype) in zip(offsets, layout):
            size = _dtype_size(dtype)
            assert (start + off) % size == 0
            self.buffers.append(torch.empty(0, dtype=dtype).set_(storage, (start + off) // size, (numel,)))
        self._registered_ptr: int | None = None
        if pin and total > 0:
            self._register(base)

    def _register(self, base: torch.Tensor) -> None:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(base.data_ptr(), base.numel(), 1)  # cudaHostRegisterPortable
        if int(err) != 0:
            warnings.warn(
                f"cudaHostRegister of {base.numel()} bytes failed (cudaError {int(err)}); this layer's host "
                "memory stays pageable and its transfers will be slower. Raise the locked-memory limit "
                "(ulimit -l) or pass pin_memory=False to silence this.",
                stacklevel=3,
            )
            return
        self._registered_ptr = base.data_ptr()

    @property
    def pinned(self) -> bool:
        return self._registered_ptr is not None

    def __del__(self) -> None:
        # never free page-locked memory without unregistering it
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def release(self) -> None:
        """Unpin and drop the memory; the caller must not hold views into it any more."""
        if self._registered_ptr is not None:
            torch.cuda.cudart().cudaHostUnregister(self._registered_ptr)
            self._registered_ptr = None
        self.buffers = []
        self._raw = None


class PinnedRange:
    """Page-lock the pages under one tensor (data parallel: the part of a node-shared arena this rank
    copies to its GPU; the rest is page-locked by the ranks that copy it)."""

    def __init__(self, t: torch.Tensor) -> None:
        self._ptr: int | None = None
        if not t.numel() or not torch.cuda.is_available():
            return
        start = t.data_ptr() // PAGE * PAGE
        end = _align(t.data_ptr() + t.numel() * t.element_size())
        self._keep = t  # the mapping must outlive the registration
        err = torch.cuda.cudart().cudaHostRegister(start, end - start, 1)
        if int(err) != 0:
            warnings.warn(f"cudaHostRegister of {end - start} bytes failed (cudaError {int(err)}); copies from it will be slower.", stacklevel=2)
            return
        self._ptr = start

    def release(self) -> None:
        if self._ptr is not None:
            torch.cuda.cudart().cudaHostUnregister(self._ptr)
            self._ptr = None
        self._keep = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


_CHUNK = 1 << 18  # elements: a 1 MiB fp32 scratch stays in cache between its two passes
_scratch = threading.local()


def add_widened(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst += src`` for a wider ``dst`` (fp32 gradients, bf16 source) without a temporary.

    ``dst.add_(src)`` with mixed dtypes allocates (and page-faults) a full-size widened copy of
    ``src`` per call; widening chunk by chunk into a small per-thread scratch that stays in cache is
    about twice as fast on the host (benchmarks/host_pipeline.py).
    """
    if src.dtype == dst.dtype or dst.numel() <= _CHUNK:
        dst.add_(src)
        return
    scratch = getattr(_scratch, "buf", None)
    if scratch is None or scratch.dtype != dst.dtype:
        scratch = _scratch.buf = torch.empty(_CHUNK, dtype=dst.dtype)
    flat_dst, flat_src = dst.view(-1), src.reshape(-1)
    n = flat_dst.numel()
    for start in range(0, n, _CHUNK):
        k = min(_CHUNK, n - start)
        buf = scratch[:k]
        buf.copy_(flat_src[start : start + k])
        flat_dst[start : start + k].add_(buf)
