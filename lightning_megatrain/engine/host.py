"""Page-aligned, exact-size host arenas; the parts that cross PCIe page-locked with ``cudaHostRegister``.

torch's caching pinned allocator has rounded requests up to a power of two (pytorch#95823), which
can double the host memory of a large model. We allocate ordinary pageable memory of the exact
size, align it to a page, and page-lock the ranges that copies to or from a GPU read or write (the
streamed image, gradient staging) ourselves: not the fp32 gradients, nor masters that are not streamed,
which only the host touches. Page-locking costs setup time (the kernel pins and maps every page) and
memory the system can no longer page out, so it is kept to what makes copies asynchronous.

Each buffer is registered by a call of its own (never one call for a whole arena or model), and a
buffer is never split between calls: a copy that spans two registrations, or a registered and an
unregistered range, may be refused by the driver (``CUDA_ERROR_INVALID_VALUE``). A failed registration
leaves that buffer pageable (its copies work, slower and synchronously), clears the CUDA error it left
(a later, unrelated kernel launch would report it), and is warned about once per run with the bytes
that stay pageable (:data:`PINS`).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch

PAGE = mmap.PAGESIZE


def _align(nbytes: int, to: int = PAGE) -> int:
    return (nbytes + to - 1) // to * to


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _loaded_cudart() -> Any:
    """The libcudart this process already uses (torch's), or None; never loads a second copy (whose
    error state would be another one)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    except OSError:
        paths = set()
    names = sorted(paths) + ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for name in names:
        try:
            return ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except (OSError, AttributeError):
            continue
    return None


def clear_cuda_error(cudart: Any) -> None:
    """Reset the calling thread's last CUDA error (``cudaGetLastError``) after a failed runtime call that
    we handle: torch checks it after kernel launches and would report it there. torch's ``cudart()``
    module has no ``cudaGetLastError``; the process's libcudart is called directly then."""
    fn = getattr(cudart, "cudaGetLastError", None)
    if fn is None:
        lib = _loaded_cudart()
        fn = getattr(lib, "cudaGetLastError", None) if lib is not None else None
    if fn is not None:
        fn()


class PinLedger:
    """What this process asked to page-lock and what stayed pageable; one warning per run.

    A run (``Runtime`` setup) calls :meth:`begin` and :meth:`end_setup`: failures during setup are
    summed and warned about once at its end with the total; one after (an offloaded input's buffer) is
    warned about then, unless this run has warned already."""

    def __init__(self) -> None:
        self.requested = 0  # bytes asked to page-lock since ``begin``
        self.pageable = 0  # of those, bytes whose registration failed
        self.errors: set[int] = set()
        self.warned = False
        self._collecting = False

    def begin(self) -> None:
        self.requested = self.pageable = 0
        self.errors = set()
        self.warned = False
        self._collecting = True

    def end_setup(self) -> None:
        self._collecting = False
        if self.pageable and not self.warned:
            self._warn()

    def register(self, ptr: int, nbytes: int) -> bool:
        """Page-lock ``[ptr, ptr + nbytes)`` (page-aligned); False (the error cleared) if that failed."""
        self.requested += nbytes
        cudart = torch.cuda.cudart()
        err = int(cudart.cudaHostRegister(ptr, nbytes, 1))  # cudaHostRegisterPortable
        if err == 0:
            return True
        clear_cuda_error(cudart)
        self.pageable += nbytes
        self.errors.add(err)
        if not self._collecting and not self.warned:
            self._warn()
        return False

    def _warn(self) -> None:
        self.warned = True
        codes = ", ".join(str(e) for e in sorted(self.errors))
        warnings.warn(
            f"megatrain: cudaHostRegister failed (cudaError {codes}) for {self.pageable} bytes ({_gib(self.pageable)}) of the "
            f"{self.requested} bytes ({_gib(self.requested)}) that cross PCIe; they stay pageable. Copies from or to "
            "pageable memory run about 2-3x slower and are synchronous (they do not overlap compute). Raise the "
            "locked-memory limit (ulimit -l, memlock in /etc/security/limits.conf or the container's), or pass "
            "pin_memory=False to page-lock nothing and silence this.",
            stacklevel=4,
        )


PINS = PinLedger()


def page_locks(device: torch.device) -> bool:
    """Whether host buffers copied to or from ``device`` are page-locked: a CUDA device's (its copies from
    pageable memory are synchronous and slower)."""
    return device.type == "cuda"


PinSpec = Union[bool, Sequence[int]]


def mapped(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor in a private anonymous mapping of its own, unmapped when the last view of it goes."""
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    size = torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, numel * size, flags=mmap.MAP_PRIVATE)  # private: transparent huge pages, no sharing on fork
    return torch.frombuffer(buf, dtype=dtype, count=numel)  # keeps ``buf`` alive while a view lives


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return None


def give_back_heap() -> None:
    """Return malloc's free heap memory to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Hand-written through ctypes: neither torch nor psutil exposes it, and glibc keeps freed blocks
    below its top and up to 64 MiB at the top in the process. Under a preloaded allocator (jemalloc,
    tcmalloc) glibc's heap holds nothing and this does nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class HostArena:
    """One host allocation holding several flat typed buffers, each starting on a page boundary.

    ``pin``: the buffers to page-lock, by index (those that copies to or from a GPU use); True: all."""

    def __init__(self, layout: Sequence[tuple[int, torch.dtype]], pin: PinSpec, shared: str | None = None) -> None:
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
        # Each buffer is a tensor of its own on the arena's storage, not a view of one base tensor, so
        # it has its own version counter: adding gradients does not make the masters look changed (which
        # would re-cast a layer's compute copy on every micro-batch).
        storage = raw.untyped_storage()
        self.buffers: list[torch.Tensor] = []
        for off, (numel, dtype) in zip(offsets, layout):
            size = _dtype_size(dtype)
            assert (start + off) % size == 0
            self.buffers.append(torch.empty(0, dtype=dtype).set_(storage, (start + off) // size, (numel,)))
        self._registered: list[int] = []  # base pointers of the page-locked ranges
        self._failed = 0
        which = range(len(layout)) if pin is True else (pin or ())
        base = raw.data_ptr() + start
        for i in which:
            nbytes = _align(layout[i][0] * _dtype_size(layout[i][1]))
            if nbytes:
                if PINS.register(base + offsets[i], nbytes):
                    self._registered.append(base + offsets[i])
                else:
                    self._failed += 1

    @property
    def pinned(self) -> bool:
        """Whether every buffer meant to be page-locked is (False when none was meant to be)."""
        return bool(self._registered) and not self._failed

    def __del__(self) -> None:
        # never free page-locked memory without unregistering it
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def release(self) -> None:
        """Unpin and drop the memory; the caller must not hold views into it any more."""
        if self._registered:
            cudart = torch.cuda.cudart()
            for ptr in self._registered:
                cudart.cudaHostUnregister(ptr)
            self._registered = []
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
        if PINS.register(start, end - start):
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
