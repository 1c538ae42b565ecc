"""The non-layer parameters in two units around the layer stack: the input side (embeddings) stepped
first and bound when a step starts, the output side (final norm, head) stepped last and bound only
when first needed; device copies kept across micro-batches; output-side gradients sent home as soon
as they are final."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from lightning_megatrain.engine import Runtime, RuntimeConfig
from models import HFLM, BlockLM
from test_engine import Stack, _loss

CPU = torch.device("cpu")


def _names(unit: Any) -> list[str]:
    return [e.name for e in unit.entries]


def test_split_around_the_layer_stack() -> None:
    rt = Runtime(BlockLM(), CPU, torch.float32, RuntimeConfig())
    try:
        # the raw parameter of the root module can be used anywhere: it stays on the input side
        assert sorted(_names(rt.outer_in)) == ["emb.weight", "gain"]
        assert _names(rt.outer_out) == ["norm.weight", "norm.bias", "head.weight"]
        assert [u.index for u in rt.units] == list(range(len(rt.units)))
        assert rt.units[0] is rt.outer_in and rt.units[-1] is rt.outer_out and len(rt.layer_units) == 4
    finally:
        rt.detach()


@pytest.mark.parametrize("tied", [False, True])
def test_split_of_an_hf_model(tied: bool) -> None:
    pytest.importorskip("transformers")
    rt = Runtime(HFLM("llama", tied=tied).model, CPU, torch.float32, RuntimeConfig())
    try:
        assert _names(rt.outer_in) == ["model.embed_tokens.weight"]  # tied: the head shares it
        assert _names(rt.outer_out) == ["model.norm.weight"] + ([] if tied else ["lm_head.weight"])
    finally:
        rt.detach()


def test_next_forward_waits_only_for_the_input_side() -> None:
    """The output side's update is held back until the last layer of the next forward has started:
    with one outer unit the forward would wait for it before its first layer and never get there."""
    torch.manual_seed(0)
    model = Stack(n=3)
    rt = Runtime(model, CPU, torch.float32, RuntimeConfig())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rt.attach_optimizer(opt)
    last_layer_started = threading.Event()
    seen: dict[str, bool] = {}

    def gate(index: int) -> None:
        if index == rt.outer_out.index and not last_layer_started.wait(timeout=10):
            raise AssertionError("the forward did not reach its last layer while the head's update was pending")

    def before_last(module: Any, args: Any) -> None:
        seen["head_updated"] = rt.worker._done >= rt.outer_out.ticket
        last_layer_started.set()

    idx = torch.randint(0, 32, (2, 5))
    try:
        with rt.bound():
            loss = _loss(model, idx)
        loss.backward()
        rt.after_backward()
        head_before = model.head.weight.detach().clone()
        model.layers[-1].register_forward_pre_hook(before_last)
        rt.gate = gate
        rt.step(opt)
        with rt.bound():
            loss = _loss(model, idx)  # the head computes with its updated weights
            head_used = model.head.weight.detach().clone()
        rt.wait()
        assert seen == {"head_updated": False}
        assert torch.equal(head_used, model.head.weight.detach()) and not torch.equal(head_used, head_before)
        # stepped in forward order, the output side last
        tickets = [u.ticket for u in rt.units]
        assert tickets == sorted(tickets) and rt.outer_out.ticket == max(tickets)
    finally:
        rt.detach()


def test_non_layer_copies_are_made_once_per_optimizer_step(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Stack(n=2)
    rt = Runtime(model, CPU, torch.float32, RuntimeConfig())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rt.attach_optimizer(opt)
    issued: list[str] = []
    real = rt.outer.issue
    monkeypatch.setattr(rt.outer, "issue", lambda outer: (issued.append(outer.side), real(outer))[1])
    idx = torch.randint(0, 32, (2, 5))
    try:
        for step in range(2):
            for micro in range(3):  # gradient accumulation: the masters do not change in between
                with rt.bound():
                    loss = _loss(model, idx)
                loss.backward()
                rt.after_backward()
            rt.step(opt)
            opt.zero_grad()
        assert issued == ["input", "output"] * 2, issued
        with rt.bound():
            model(idx)
        assert len(issued) == 6
        with torch.no_grad():
            model.head.weight.mul_(0.5)  # a change outside the optimizer is seen too
        with rt.bound():
            model(idx)
            used = model.head.weight.detach().clone()
        assert issued[6:] == ["output"]
        assert torch.equal(used, model.head.weight.detach())
    finally:
        rt.detach()


def test_output_side_gradients_go_home_before_the_layers_backward() -> None:
    torch.manual_seed(0)
    model = Stack(n=3)
    rt = Runtime(model, CPU, torch.float32, RuntimeConfig())
    order: list[str] = []
    real = rt.link.send
    rt.link.send = lambda unit, *a, **k: (order.append(unit.name), real(unit, *a, **k))[1]  # type: ignore[method-assign]
    try:
        with rt.bound():
            loss = _loss(model, torch.randint(0, 32, (2, 5)))
        loss.backward()
        assert order == ["outer_out", "layer2", "layer1", "layer0"]  # the input side waits for after_backward
        rt.after_backward()
        assert order[-1] == "outer_in"
        assert all(p.grad is not None for p in model.parameters())
    finally:
        rt.detach()


def test_non_layer_leaves_are_the_fp32_masters_under_bf16() -> None:
    """The non-layer weights travel as their fp32 masters: embeddings feed an fp32 residual stream and
    the head and final norm compute as in plain mixed precision (autocast casts the head's matmul).
    Guards against a bf16 round trip of the embeddings, which plain training never makes."""
    torch.manual_seed(0)
    model = Stack(n=2)
    rt = Runtime(model, CPU, torch.bfloat16, RuntimeConfig(host_memory="fast"))
    try:
        (e_emb,) = [e for e in rt.outer_in.entries if e.name == "emb.weight"]
        (e_head,) = [e for e in rt.outer_out.entries if e.name == "head.weight"]
        with rt.bound():
            emb = model.emb.weight
            model.head(torch.zeros(8))  # calling the head binds the output side
            head = model.head.weight
            assert emb.dtype == head.dtype == torch.float32
            assert emb is not e_emb.param and head is not e_head.param  # device leaves, not the host masters
            assert torch.equal(emb.detach(), e_emb.param.detach()) and torch.equal(head.detach(), e_head.param.detach())
    finally:
        rt.detach()


def test_layer_compute_copies_are_cast_once_per_update() -> None:
    """Adding gradients must not make a layer look changed (its buffers used to share one version
    counter), and a fused optimizer's update, which bumps no version, must still re-cast it."""

    class Linears(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    model = Linears()
    rt = Runtime(model, CPU, torch.bfloat16, RuntimeConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    rt.attach_optimizer(opt)  # fused
    unit = rt.layer_units[1]
    try:
        for step in range(2):
            versions = set()
            for micro in range(3):
                with rt.bound(), torch.autocast("cpu", torch.bfloat16):
                    loss = model(torch.randn(4, 8)).float().square().mean()
                loss.backward()
                rt.after_backward()
                versions.add(unit.compute._version)
            assert len(versions) == 1  # not re-cast between micro-batches
            rt.step(opt)
            opt.zero_grad()
            rt.wait()
            assert unit.compute._version > versions.pop()
            for e in unit.entries:  # the image: matrices cast to bf16, vectors stored there in fp32
                assert torch.equal(unit.param_view(unit.compute, e), unit.store_view(e).to(e.stream_dtype))
    finally:
        rt.detach()


def test_every_bind_waits_for_the_workers_copy_of_the_updated_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA streams, the worker copies a non-layer unit's updated values into the same device
    buffer after each optimizer step; every forward must make the compute stream wait for that copy
    (``ready``), also when it reuses the bound leaves. Runs the engine with recording stand-ins for the
    streams (the CPU's own copies are synchronous and could not show the race). Guards against reusing
    the leaves without the wait (seen: a wait at step 0 only)."""
    import contextlib

    from lightning_megatrain.engine import runtime as rtmod

    log: list[tuple[str, int, Any]] = []

    class Ev:
        count = 0

        def __init__(self) -> None:
            Ev.count += 1
            self.id = Ev.count

        def record(self, stream: Any = None) -> None:
            log.append(("record", self.id, stream))

        def synchronize(self) -> None:
            pass

    class RecordingStreams:
        cuda = True

        def __init__(self, device: torch.device) -> None:
            self.device, self.h2d, self.d2h = device, "h2d", "d2h"

        def event(self) -> Ev:
            return Ev()

        def compute(self) -> str:
            return "compute"

        def wait(self, stream: Any, ev: Ev) -> None:
            log.append(("wait", ev.id, stream))

        def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
            dst.copy_(src)

        def synchronize(self) -> None:
            pass

        def record_all(self) -> list:
            return []

    monkeypatch.setattr(rtmod, "Streams", RecordingStreams)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)
    torch.manual_seed(0)
    model = Stack(n=3)
    rt = Runtime(model, CPU, torch.float32, RuntimeConfig(host_memory="compact"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rt.attach_optimizer(opt)
    ready = {side: rt.outer.copies[u.index].ready.id for side, u in (("in", rt.outer_in), ("out", rt.outer_out))}
    try:
        for step in range(3):
            log.clear()
            with rt.bound():
                loss = _loss(model, torch.randint(0, 32, (2, 5)))
            loss.backward()
            rt.after_backward()
            for side, ev in ready.items():
                assert ("wait", ev, "compute") in log, (step, side)
            log.clear()
            rt.step(opt)
            rt.wait()
            assert ("record", ready["in"], "h2d") in log  # the worker copied the update into the buffer
    finally:
        rt.detach()
