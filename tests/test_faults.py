"""Host-worker failures raise promptly in the training thread; nothing hangs, nothing leaks."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import lightning as L
import pytest
import torch
from torch import nn

from lightning_megatrain import MegaTrainStrategy
from lightning_megatrain.engine import Runtime, RuntimeConfig, WorkerError
from models import BlockLM, data, trainer
from test_engine import Stack

CPU = torch.device("cpu")
LIMIT_S = 20.0  # a hang fails the test instead of blocking the run


IDX = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))


def _forward(rt: Runtime, model: nn.Module) -> torch.Tensor:
    with rt.bound():
        return nn.functional.cross_entropy(model(IDX).flatten(0, 1), IDX.flatten())


def _within(fn: Callable[[], Any], seconds: float = LIMIT_S) -> BaseException | None:
    """Run ``fn`` on a thread; fail if it is still running after ``seconds`` (a hang), else return its error."""
    out: dict[str, BaseException] = {}

    def target() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001
            out["error"] = err

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds} s: a failed host task hung the training thread"
    return out.get("error")


def _host_threads() -> int:
    return sum(t.name == "megatrain-host" and t.is_alive() for t in threading.enumerate())


def _slow_failure(message: str, exc: type = ValueError) -> Callable[..., None]:
    def fail(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.2)  # fail after backward went on to the next layers, as a slow host does
        raise exc(message)

    return fail


@pytest.fixture
def rt() -> Any:
    torch.manual_seed(0)
    before = _host_threads()
    model = Stack(n=6, p=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    runtime = Runtime(model, CPU, torch.float32, RuntimeConfig(prefetch=1))  # 2 gradient channels, 6 layers
    runtime.attach_optimizer(opt)
    runtime.model, runtime.opt = model, opt  # type: ignore[attr-defined]
    yield runtime
    runtime.detach()
    assert _host_threads() == before, "the host worker thread outlived detach"


def test_failed_accumulation_raises_in_backward_instead_of_hanging(rt: Any) -> None:
    rt.layer_units[-1].accumulate = _slow_failure("accumulate blew up")  # the first layer of backward
    where: list[str] = []

    def step() -> None:
        loss = _forward(rt, rt.model)
        where.append("backward")
        loss.backward()
        where.append("after_backward")
        rt.after_backward()

    err = _within(step)
    assert isinstance(err, WorkerError) and "accumulate blew up" in str(err.__cause__), err
    assert where == ["backward"], "raised in backward, not later"
    # every gradient channel is back in the pool: nothing is left waiting for one
    assert rt.channels._free.qsize() == rt.config.prefetch + 1
    # and the failure is sticky: the step refuses to run on incomplete gradients
    with pytest.raises(WorkerError, match="accumulate blew up"):
        rt.step(rt.opt)


def test_failed_optimizer_step_raises_in_the_next_forward(rt: Any) -> None:
    _forward(rt, rt.model).backward()
    rt.after_backward()
    failing = rt.layer_units[3]
    ids = {id(e.param) for e in failing.entries}

    class Broken(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            if any(id(p) in ids for g in self.param_groups for p in g["params"]):
                time.sleep(0.2)
                raise RuntimeError("optimizer blew up")
            return super().step(closure)

    rt.opt.__class__ = type("Broken", (Broken, type(rt.opt)), {})  # keep megatrain's waiting subclass
    rt.step(rt.opt)  # returns at once; the failure happens on the host worker
    err = _within(lambda: _forward(rt, rt.model))
    assert isinstance(err, WorkerError) and "optimizer blew up" in str(err.__cause__), err


class _FailingEvent:
    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        time.sleep(0.2)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_device_error_in_sync_pending_raises_in_the_next_forward(rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _forward(rt, rt.model).backward()
    rt.after_backward()
    # on a GPU the step first synchronises with the kernels still queued; a device error surfaces there
    monkeypatch.setattr(rt.streams, "record_all", lambda: [_FailingEvent()])
    rt.step(rt.opt)
    err = _within(lambda: _forward(rt, rt.model))
    assert isinstance(err, WorkerError) and "illegal memory access" in str(err.__cause__), err


def test_device_error_in_a_gradient_copy_raises_before_the_step(rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # an accumulation task first waits for its D2H copy (here: the non-layer gradients sent at the end of
    # backward); a device error surfaces in that synchronize and is raised before the optimizer step
    # every event made from here on fails when synchronised (the worker is the only one that does)
    monkeypatch.setattr(rt.streams, "event", _FailingEvent)

    def step() -> None:
        _forward(rt, rt.model).backward()
        rt.after_backward()

    err = _within(step)
    assert isinstance(err, WorkerError) and "illegal memory access" in str(err.__cause__), err


def test_an_exception_inside_run_backward_releases_its_slot_and_channel(rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ended: list[Any] = []
    real_end = rt.slots.end_use
    monkeypatch.setattr(rt.slots, "end_use", lambda slot: (ended.append(slot), real_end(slot)))

    real_send = rt.link.send

    def broken_send(unit: Any, *args: Any, **kwargs: Any) -> None:
        if not unit.name.startswith("layer"):
            return real_send(unit, *args, **kwargs)  # the output side's gradients go home first
        raise RuntimeError("copy failed")

    monkeypatch.setattr(rt.link, "send", broken_send)
    loss = _forward(rt, rt.model)
    ended.clear()
    with pytest.raises(RuntimeError, match="copy failed"):
        loss.backward()
    assert len(ended) == 1  # the slot of the failing layer was released
    assert rt.channels._free.qsize() == rt.config.grad_channels  # and its channel went back


def test_trainer_fit_stops_with_worker_error_and_leaves_no_thread() -> None:
    before = _host_threads()

    class BadStep(BlockLM):
        def configure_optimizers(self) -> Any:
            model = self

            class Broken(torch.optim.AdamW):
                def step(self, closure: Any = None) -> Any:  # type: ignore[override]
                    if model.global_step >= 1:
                        raise RuntimeError("host optimizer failed")
                    return super().step(closure)

            return Broken(self.parameters(), lr=1e-3)

    L.seed_everything(0)
    model = BadStep(n=4, dropout=0.0)
    t = trainer(MegaTrainStrategy(), max_steps=5)
    err = _within(lambda: t.fit(model, data()))
    assert isinstance(err, WorkerError) and "host optimizer failed" in str(err.__cause__), err
    assert _host_threads() == before
    assert all(type(p) is nn.Parameter and p.device.type == "cpu" for p in model.parameters())
