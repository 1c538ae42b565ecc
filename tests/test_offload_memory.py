"""Activation offload frees the device copies of the saved layer inputs, and reuses its host buffers
when sequence lengths vary (page-locking memory again each step would be slow and synchronising)."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch

from lightning_megatrain.engine import Runtime, RuntimeConfig
from lightning_megatrain.engine import saved_inputs as saved_mod
from test_engine import Stack, _loss

HIDDEN = torch.Size([3, 7, 8])


def _live_hidden_states() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and o.shape == HIDDEN)


def _forward_and_watch(offload: bool, n: int = 6) -> tuple[list[bool], int, list[bool]]:
    torch.manual_seed(0)
    model = Stack(n=n)
    rt = Runtime(model, torch.device("cpu"), torch.float32, RuntimeConfig(offload_activations=offload))
    refs: list[weakref.ref] = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0]))) for layer in model.layers]
    try:
        idx = torch.randint(0, 32, tuple(HIDDEN[:2]))
        with rt.bound():
            loss = _loss(model, idx)
        gc.collect()
        after_forward = [r() is not None for r in refs]
        live = _live_hidden_states()
        loss.backward()
        rt.after_backward()
        del loss
        gc.collect()
        after_backward = [r() is not None for r in refs]
        assert all(p.grad is not None for p in model.parameters())
    finally:
        for h in hooks:
            h.remove()
        rt.detach()
    return after_forward, live, after_backward


def test_saved_layer_inputs_stay_alive_without_offload() -> None:
    alive, live, after = _forward_and_watch(offload=False)
    assert alive == [True] * 6  # each layer's input is saved for its recompute
    assert live >= 6  # about one hidden state per layer
    assert not any(after)  # ... and freed by backward


def test_offload_keeps_no_device_copy_of_the_layer_inputs() -> None:
    alive, live, after = _forward_and_watch(offload=True)
    # only the host copies exist between forward and backward: the layer inputs are gone once the next
    # layer ran (the last layer's output, the head's input, is the only hidden state still needed)
    assert not any(alive[:-1])
    assert live <= 2
    assert not any(after)


def test_offload_host_buffers_are_reused_across_sequence_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    released: list[int] = []
    real = saved_mod.HostArena

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self.nbytes)

        def release(self) -> None:
            if self._raw is not None:
                released.append(self.nbytes)
            super().release()

    monkeypatch.setattr(saved_mod, "HostArena", Counting)
    torch.manual_seed(0)
    model = Stack(n=3)
    rt = Runtime(model, torch.device("cpu"), torch.float32, RuntimeConfig(offload_activations=True))
    try:
        def step(length: int) -> None:
            with rt.bound():
                loss = _loss(model, torch.randint(0, 32, (2, length)))
            loss.backward()
            rt.after_backward()

        made.clear()  # the gradient channels' arenas
        step(64)
        assert len(made) == 3 and not released  # one arena per offloaded layer input
        arenas = list(rt.saved.arenas)
        for length in (60, 33, 64, 52, 17):  # shorter ones fit in the arenas of the longest so far
            step(length)
        assert len(made) == 3 and not released
        assert all(a is b for a, b in zip(rt.saved.arenas, arenas))
        step(65)  # a longer sequence grows each arena to the next size class ...
        assert len(made) == 6 and len(released) == 3
        for length in (64, 70, 80):  # ... which then covers nearby lengths too
            step(length)
        assert len(made) == 6
    finally:
        rt.detach()


def test_size_classes_waste_at_most_a_quarter() -> None:
    sizes = set()
    for n in range(1, 5000):
        c = saved_mod.size_class(n)
        assert n <= c <= n * 1.25 + 1
        sizes.add(c)
    assert len(sizes) < 60  # few distinct sizes: varying lengths land on the same class
