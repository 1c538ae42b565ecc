"""The engine without Lightning: slots, the host worker, the per-layer autograd node, teardown."""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import pytest
import torch
from torch import nn

from lightning_megatrain.engine import Runtime, RuntimeConfig, WorkerError
from models import Block

CPU = torch.device("cpu")


class Stack(nn.Module):
    def __init__(self, n: int = 5, d: int = 8, p: float = 0.2) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, d)
        self.layers = nn.ModuleList([Block(d, p=p) for _ in range(n)])
        self.head = nn.Linear(d, 32)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())


def _step(rt: Runtime, model: nn.Module, idx: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with rt.bound():
        loss = _loss(model, idx)
    loss.backward()
    rt.after_backward()
    return loss


@pytest.mark.parametrize("prefetch", [1, 2, 3, 7])
def test_gradients_exact_for_every_prefetch_depth(prefetch: int) -> None:
    torch.manual_seed(0)
    ref = Stack()
    model = copy.deepcopy(ref)
    idx = torch.randint(0, 32, (3, 7))
    rt = Runtime(model, CPU, torch.float32, RuntimeConfig(prefetch=prefetch))
    try:
        for seed in range(2):
            torch.manual_seed(seed)
            expected = _loss(ref, idx)
            expected.backward()
            got = _step(rt, model, idx, seed)
            assert got.item() == expected.item()
            for (name, p), q in zip(ref.named_parameters(), model.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)
        n = len(rt.layers)
        slots = min(prefetch + 1, n)
        # the first forward loads every layer; backward reuses the layers still resident, and the second
        # micro-batch (no optimizer step between) those still resident after the first backward
        assert rt.slots.loads == (n + n - slots) + 2 * (n - slots)
    finally:
        rt.detach()


def test_optimizer_step_overlaps_next_forward_and_waits_per_layer() -> None:
    torch.manual_seed(0)
    model = Stack(n=4)
    log: list[tuple[str, int]] = []
    last = set(map(id, model.layers[-1].parameters()))

    class SlowLast(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            params = [p for g in self.param_groups for p in g["params"]]
            if params and id(params[0]) in last:
                time.sleep(0.3)
            out = super().step(closure)
            for i, layer in enumerate(model.layers):
                if params and any(p is q for p in params for q in layer.parameters()):
                    log.append(("stepped", i))
            return out

    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: log.append(("forward", i)))
    opt = SlowLast(model.parameters(), lr=0.1)
    rt = Runtime(model, CPU, torch.float32, RuntimeConfig(fused_optimizer=False))
    rt.attach_optimizer(opt)
    idx = torch.randint(0, 32, (2, 5))
    try:
        _step(rt, model, idx, 0)
        rt.step(opt)
        tickets = [u.ticket for u in rt.units]
        assert tickets == sorted(tickets) and len(set(tickets)) == len(tickets)
        log.clear()
        with rt.bound(), torch.no_grad():
            model(idx)
        rt.wait()
        # layer 0 of the next forward ran while the last layer's update was still in flight
        assert log.index(("forward", 0)) < log.index(("stepped", 3))
        # and no layer ran before its own update was done
        for i in range(4):
            assert log.index(("stepped", i)) < log.index(("forward", i))
    finally:
        rt.detach()


def test_hyperparameters_are_snapshotted_when_the_step_starts() -> None:
    torch.manual_seed(0)
    model = Stack(n=2)
    ref = copy.deepcopy(model)
    idx = torch.randint(0, 32, (2, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    rt = Runtime(model, CPU, torch.float32, RuntimeConfig())
    rt.attach_optimizer(opt)
    try:
        torch.manual_seed(0)
        _loss(ref, idx).backward()
        ref_opt.step()
        _step(rt, model, idx, 0)
        gate = threading.Event()
        rt.worker.submit(gate.wait)  # hold the worker so the step is still pending
        rt.step(opt)
        opt.param_groups[0]["lr"] = 123.0  # what a scheduler does right after optimizer_step
        gate.set()
        rt.wait()
        for p, q in zip(ref.parameters(), model.parameters()):
            torch.testing.assert_close(q, p)
    finally:
        rt.detach()


def test_a_failing_host_task_is_raised_in_the_training_thread() -> None:
    model = Stack(n=2)

    class Broken(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            raise ValueError("bad optimizer")

    opt = Broken(model.parameters(), lr=0.1)
    rt = Runtime(model, CPU, torch.float32, RuntimeConfig())
    rt.attach_optimizer(opt)
    try:
        _step(rt, model, torch.randint(0, 32, (2, 5)), 0)
        rt.step(opt)
        with pytest.raises(WorkerError, match="bad optimizer"):
            opt.zero_grad()
    finally:
        rt.detach()
    assert not rt.worker.alive


def test_bf16_compute_copy_follows_in_place_changes_of_the_masters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
    x = torch.randn(2, 8)
    rt = Runtime(model, CPU, torch.bfloat16, RuntimeConfig())
    try:
        new = {k: v * 0.5 for k, v in model.state_dict().items()}
        with rt.bound(), torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            before = model(x)
        model.load_state_dict(new)
        with rt.bound(), torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            after = model(x)
        expected = x
        for layer in model:
            expected = nn.functional.linear(expected, layer.weight, layer.bias)
        assert not torch.equal(before, after)
        torch.testing.assert_close(after.float(), expected, rtol=5e-2, atol=5e-2)
        unit = rt.layer_units[0]
        for e in unit.entries:  # the weight matrix streams in bf16, the bias (a vector) in fp32
            streamed = unit.param_view(unit.compute, e)
            torch.testing.assert_close(streamed.float(), e.param.detach(), rtol=1e-2, atol=1e-2)
            assert streamed.dtype == (torch.bfloat16 if e.param.dim() == 2 else torch.float32)
    finally:
        rt.detach()


def in_arena(rt: Runtime, p: torch.Tensor) -> bool:
    return any(unit.holds(p) for unit in rt.units)


def test_detach_restores_plain_modules_and_keeps_values() -> None:
    torch.manual_seed(0)
    model = Stack(n=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    rt = Runtime(model, CPU, torch.float32, RuntimeConfig())
    assert all(in_arena(rt, p) for p in params)  # views into the arenas
    arenas = [(u.master.data_ptr(), u.master.numel() * 4) for u in rt.units]
    _step(rt, model, torch.randint(0, 32, (2, 5)), 0)
    grads = [p.grad.clone() for p in params]
    rt.detach()
    assert list(model.parameters()) == params  # same Parameter objects
    assert not [p for p in params for a, n in arenas if a <= p.data_ptr() < a + n]
    assert all("forward" not in layer.__dict__ for layer in model.layers)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class Routed(nn.Module):
    """A layer with tuple output, a non-float output, a kwarg tensor that needs grad, and experts
    that get no tokens (their gradient stays None, as in plain autograd)."""

    def __init__(self, d: int = 8, experts: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(d, experts)
        self.experts = nn.ModuleList([nn.Linear(d, d) for _ in range(experts)])

    def forward(self, x: torch.Tensor, *, bias: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, torch.Tensor, None]:
        choice = self.gate(x).argmax(-1).clamp(max=1)  # experts 2 and 3 never get a token
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            sel = choice == e
            if sel.any():
                out[sel] = expert(x[sel])
        return x + out + bias, choice, None


class RoutedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.bias = nn.Parameter(torch.zeros(8))
        self.layers = nn.ModuleList([Routed() for _ in range(3)])
        self.head = nn.Linear(8, 32)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for layer in self.layers:
            x, choice, _ = layer(x, bias=self.bias * 2, cache=object())
            assert choice.dtype == torch.int64 and not choice.requires_grad
        return self.head(x)


def test_unused_experts_keep_none_grads_and_kwarg_tensors_get_gradients() -> None:
    torch.manual_seed(0)
    ref = RoutedModel()
    model = copy.deepcopy(ref)
    idx = torch.randint(0, 32, (4, 6))
    _loss(ref, idx).backward()
    rt = Runtime(model, CPU, torch.float32, RuntimeConfig())
    try:
        _step(rt, model, idx, 0)
        for (name, p), q in zip(ref.named_parameters(), model.parameters()):
            if p.grad is None:
                assert q.grad is None, name
            else:
                torch.testing.assert_close(q.grad, p.grad, msg=name)
        assert model.layers[0].experts[3].weight.grad is None
        assert model.bias.grad is not None and model.bias.grad.abs().sum() > 0
    finally:
        rt.detach()


def test_tied_weight_between_a_layer_and_the_outside_is_refused() -> None:
    model = Stack(n=2)
    model.layers[1].out.weight = nn.Parameter(torch.zeros(8, 32))
    model.head.weight = model.layers[0].fc.weight  # (32, 8)
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ValueError, match="also used outside the layer stack"):
        Runtime(model, CPU, torch.float32, RuntimeConfig())
    assert [p.data_ptr() for p in model.parameters()] == ptrs


class NormBlock(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.fc(x))


def test_recompute_does_not_update_batchnorm_stats_twice() -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(*[NormBlock() for _ in range(3)])
    model = copy.deepcopy(ref)
    x = torch.randn(16, 8)
    ref(x).square().sum().backward()
    rt = Runtime(model, CPU, torch.float32, RuntimeConfig())
    try:
        with rt.bound():
            loss = model(x).square().sum()
        loss.backward()
        rt.after_backward()
        for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(b, a, msg=name)
        for p, q in zip(ref.parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad)
    finally:
        rt.detach()
