"""Page-locking only what crosses PCIe (issue 24 point 3), on the CPU with a fake ``cudart`` that records
each ``cudaHostRegister``: the streamed image and gradient staging of each unit and the gradient channels,
one registration per buffer, never the fp32 gradients or masters the host alone reads; a failed
registration clears the CUDA error, stays pageable and is warned about once with its bytes; release
unregisters exactly what was registered."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import pytest
import torch

from lightning_megatrain.engine import Runtime, RuntimeConfig
from lightning_megatrain.engine import host as host_mod
from lightning_megatrain.engine import runtime as runtime_mod
from lightning_megatrain.engine.host import PAGE, PINS, HostArena, PinnedRange
from models import BlockLM

CPU = torch.device("cpu")
ERR = 2  # cudaErrorMemoryAllocation


class FakeCudart:
    """Records page-locked ranges; ``fail(ptr, size)`` says which registrations fail (leaving a last error)."""

    def __init__(self, fail: Optional[Callable[[int, int], bool]] = None) -> None:
        self.fail = fail or (lambda ptr, size: False)
        self.registered: dict[int, int] = {}
        self.calls: list[tuple[int, int]] = []
        self.unregistered: list[int] = []
        self.last_error = 0
        self.cleared = 0

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        assert ptr % PAGE == 0 and size % PAGE == 0 and size > 0
        for p, s in self.registered.items():
            assert ptr + size <= p or p + s <= ptr, "overlapping registrations"
        if self.fail(ptr, size):
            self.last_error = ERR
            return ERR
        self.registered[ptr] = size
        self.calls.append((ptr, size))
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        assert ptr in self.registered, "unregistering what was not registered"
        del self.registered[ptr]
        self.unregistered.append(ptr)
        return 0

    def cudaGetLastError(self) -> int:
        err, self.last_error = self.last_error, 0
        self.cleared += 1
        return err


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCudart:
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime_mod, "page_locks", lambda device: True)  # the CPU runtime pins as on a GPU
    return cudart


def _range(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), host_mod._align(t.numel() * t.element_size())


def _overlaps(t: torch.Tensor, ranges: dict[int, int]) -> bool:
    a, n = t.data_ptr(), t.numel() * t.element_size()
    return any(a < p + s and p < a + n for p, s in ranges.items())


def _runtime(mode: str, **kw: Any) -> tuple[Runtime, BlockLM]:
    torch.manual_seed(0)
    model = BlockLM(d=64, n=3)
    return Runtime(model, CPU, torch.bfloat16, RuntimeConfig(host_memory=mode, **kw)), model


@pytest.mark.parametrize("mode", ["fast", "compact", "lean"])
def test_only_the_streamed_image_and_staging_are_page_locked(fake: FakeCudart, mode: str) -> None:
    rt, model = _runtime(mode)
    try:
        expected = set()
        for unit in rt.units:
            expected.add(_range(unit.compute))  # the image: one H2D copy moves it
            if unit.staging is not None:
                expected.add(_range(unit.staging))  # where a non-layer unit's gradients land
            assert unit.grad.numel() and not _overlaps(unit.grad, fake.registered), unit.name  # fp32 grads: host only
            if mode == "fast":
                assert unit.master.numel() or unit.name.startswith("outer"), unit.name
                assert not _overlaps(unit.master, fake.registered), unit.name  # fp32 masters: not streamed
            else:
                assert unit.master.numel() == 0  # the masters are the image: streamed, page-locked
            assert unit.arena.pinned
        assert rt.link.arena is not None
        expected.update(_range(b) for b in rt.link.arena.buffers)  # gradient channels: D2H
        assert set(fake.calls) == expected  # one registration per buffer, nothing else
        layer_weights = [p for layer in model.blocks for p in layer.parameters()]
        for p in layer_weights:
            # a layer's parameters live in page-locked memory only where they are what is streamed
            assert _overlaps(p, fake.registered) == (mode != "fast" or p.dim() < 2), p.shape
        assert fake.cleared == 0
    finally:
        rt.detach()
    assert fake.registered == {} and sorted(fake.unregistered) == sorted(p for p, _ in fake.calls)


def test_the_image_of_fast_is_what_the_layer_slots_copy(fake: FakeCudart) -> None:
    rt, _ = _runtime("fast")
    try:
        for unit in rt.layer_units:
            assert unit.compute.dtype == torch.uint8 and unit.compute.numel() == unit.nbytes
            assert fake.registered[unit.compute.data_ptr()] >= unit.nbytes
    finally:
        rt.detach()


def test_a_failed_registration_clears_the_error_stays_pageable_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def every_other(ptr: int, size: int) -> bool:
        seen.append(size)
        return len(seen) % 2 == 0

    cudart = FakeCudart(every_other)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(runtime_mod, "page_locks", lambda device: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt, _ = _runtime("fast")
    try:
        failed = sum(size for i, size in enumerate(seen) if i % 2 == 1)
        ours = [w for w in caught if "cudaHostRegister" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]  # once per run, with the total
        message = str(ours[0].message)
        assert f"for {failed} bytes" in message and f"of the {sum(seen)} bytes" in message and "slower" in message
        assert cudart.last_error == 0 and cudart.cleared == len(seen) // 2  # each failure's error cleared
        assert PINS.pageable == failed
        assert not all(u.arena.pinned for u in rt.units) and any(u.arena.pinned for u in rt.units)
        registered = dict(cudart.registered)
    finally:
        rt.detach()
    assert cudart.registered == {} and sorted(cudart.unregistered) == sorted(registered)


def test_after_setup_the_first_failure_warns_and_later_ones_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    cudart = FakeCudart(lambda ptr, size: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    PINS.begin()
    PINS.end_setup()  # a run whose setup pinned everything: an offloaded input's buffer fails later
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arenas = [HostArena([(3 * PAGE, torch.uint8)], pin=True) for _ in range(3)]
        pinned = PinnedRange(torch.empty(5 * PAGE, dtype=torch.uint8))
    assert len([w for w in caught if "cudaHostRegister" in str(w.message)]) == 1
    assert f"for {3 * PAGE} bytes" in str(caught[0].message)
    assert cudart.last_error == 0 and cudart.cleared == 4 and not any(a.pinned for a in arenas)
    for a in arenas:
        a.release()
    pinned.release()
    assert cudart.unregistered == []  # nothing was registered: nothing is unregistered


def test_arena_buffers_are_registered_one_call_each(fake: FakeCudart) -> None:
    layout = [(1000, torch.float32), (10, torch.float32), (5 * PAGE + 1, torch.uint8), (7, torch.bfloat16)]
    arena = HostArena(layout, pin=[2, 3])
    assert fake.calls == [_range(arena.buffers[2]), _range(arena.buffers[3])]
    assert fake.calls[0][1] == 6 * PAGE and arena.pinned
    arena.release()
    assert fake.registered == {}
    assert not HostArena(layout, pin=False).pinned and len(fake.calls) == 2


def test_without_cudaGetLastError_in_torch_the_process_libcudart_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class Lib:
        def cudaGetLastError(self) -> int:
            calls.append("lib")
            return 0

    monkeypatch.setattr(host_mod, "_loaded_cudart", lambda: Lib())
    host_mod.clear_cuda_error(object())  # torch's cudart module: no cudaGetLastError
    assert calls == ["lib"]
    monkeypatch.setattr(host_mod, "_loaded_cudart", lambda: None)
    host_mod.clear_cuda_error(object())  # no libcudart loaded (a CPU build): nothing to clear


@pytest.mark.parametrize("mode", ["fast", "compact"])
def test_the_plan_says_what_is_page_locked_and_what_setup_writes(fake: FakeCudart, mode: str) -> None:
    from lightning_megatrain.engine.layers import find_layers
    from lightning_megatrain.memory import plan_memory

    torch.manual_seed(0)
    model = BlockLM(d=64, n=3)
    plan = plan_memory(model, find_layers(model), torch.bfloat16, CPU, host_memory=mode, grad_channels=2)
    rt = Runtime(model, CPU, torch.bfloat16, RuntimeConfig(host_memory=mode, grad_channels=2))
    try:
        registered = sum(fake.registered.values())  # each buffer rounded up to whole pages
        assert plan.pinned_bytes <= registered < plan.pinned_bytes + len(fake.calls) * PAGE
        written = sum(u.master.numel() * 4 + u.nbytes for u in rt.units)  # masters and images: what setup fills
        padding = 64 * sum(len(u.entries) for u in rt.units)  # each tensor of an image starts on 64 bytes
        assert plan.setup_bytes <= written < plan.setup_bytes + padding
        assert "page-locked with a GPU" in str(plan) and "setup: writes" in str(plan)
    finally:
        rt.detach()
