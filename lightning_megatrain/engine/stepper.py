"""The host worker: gradient accumulation and the layer-by-layer optimizer step, in FIFO order.

One thread runs every piece of host work that touches gradients or masters, so their order is the
order they were submitted in: a layer's gradients of step k+1 are never added before its update of
step k is done. The main thread waits on a ticket, i.e. only for the work it needs.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class WorkerError(RuntimeError):
    """Raised in the training process when a task on the megatrain host worker failed."""


def default_host_threads() -> int:
    """All cores this process may use but one: the training thread keeps a core to launch kernels."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def per_thread_intra_op() -> bool:
    """Whether ``torch.set_num_threads`` called on one thread leaves the others alone: true for torch's
    OpenMP backend (the team size is a per-thread OpenMP setting, MKL's is set thread-locally), not
    for the native thread pool, which is one pool for the whole process."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


class Worker:
    """One host thread running tasks in submission order.

    A failure is sticky: once a task failed, every later task is skipped (its inputs may be wrong) and
    every ``wait``/``check`` raises :class:`WorkerError`, so training stops instead of going on with
    incomplete gradients. A task's ``cleanup`` runs even when the task failed or was skipped: it returns
    what the training thread may be blocked on (a gradient channel), so a failure can never hang it.

    ``threads`` caps the intra-op threads of the worker's own kernels (fused optimizer, gradient
    accumulation), so the host step does not take every core from the training thread that launches
    the GPU's kernels. It is set on the worker thread with ``torch.set_num_threads``, which under
    torch's OpenMP backend changes only the calling thread's team size; torch also records the value
    as the default for threads that start later, so the creating thread restores that default. Under
    the native thread pool the setting is process-wide and the cap is not applied.
    """

    def __init__(self, name: str = "megatrain-host", threads: int | None = None) -> None:
        self._tasks: deque[tuple[Callable[[], None], Callable[[], None] | None]] = deque()
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._error: BaseException | None = None
        self._closed = False
        self.full_waits = 0  # waits for all submitted work (instrumentation: each drains the device's queue)
        self.threads: int | None = None  # the cap in effect on the worker thread
        # called while a wait blocks (every second): raises if what the tasks wait on can never come
        # (data parallel: a rank of the node died), instead of waiting for good
        self.watch: Callable[[], None] | None = None
        cap = threads if threads is not None and per_thread_intra_op() else None
        default = torch.get_num_threads()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(cap, started), name=name, daemon=True)
        self._thread.start()
        started.wait()
        if cap is not None:
            torch.set_num_threads(default)  # this thread and later ones keep the process default

    def submit(self, fn: Callable[[], None], cleanup: Callable[[], None] | None = None) -> int:
        with self._cond:
            if self._closed:
                raise RuntimeError("the megatrain host worker is closed")
            self._tasks.append((fn, cleanup))
            self._submitted += 1
            self._cond.notify_all()
            return self._submitted

    def wait(self, ticket: int | None = None) -> None:
        """Block until task ``ticket`` (default: every task submitted) is done; raise if any task failed."""
        with self._cond:
            if ticket is None:
                self.full_waits += 1
            target = self._submitted if ticket is None else ticket
            while self._done < target and self._error is None:
                if not self._thread.is_alive():
                    raise WorkerError("the megatrain host worker thread is gone; its pending tasks will never finish")
                self._cond.wait(1.0)
                if self.watch is not None and self._done < target and self._error is None:
                    self.watch()
            self._raise()

    def done(self, ticket: int) -> bool:
        """Whether task ``ticket`` has finished (or a task failed, which ``wait`` then raises); never blocks."""
        with self._cond:
            return self._done >= ticket or self._error is not None

    def check(self) -> None:
        """Raise :class:`WorkerError` if a host task has failed (does not wait)."""
        with self._cond:
            self._raise()
            if not self._thread.is_alive() and not self._closed:
                raise WorkerError("the megatrain host worker thread is gone; its pending tasks will never finish")

    @property
    def failed(self) -> bool:
        return self._error is not None

    def _raise(self) -> None:
        if self._error is not None:
            err = self._error
            raise WorkerError(
                f"a megatrain host task failed: {err!r}. Gradients or weights of this step are incomplete, so "
                "training cannot go on; the original error is chained below."
            ) from err

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Finish (or, after a failure, skip) queued work, run every cleanup and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self, cap: int | None, started: threading.Event) -> None:
        if cap is not None:
            torch.set_num_threads(cap)
            self.threads = torch.get_num_threads()
        started.set()
        while True:
            with self._cond:
                while not self._tasks and not self._closed:
                    self._cond.wait()
                if not self._tasks:
                    return
                fn, cleanup = self._tasks.popleft()
                failed = self._error is not None
            error: BaseException | None = None
            if not failed:  # after a failure, later tasks are skipped: their inputs may be wrong
                try:
                    fn()
                except BaseException as err:  # noqa: BLE001 - raised in the waiting thread
                    error = err
            if cleanup is not None:
                try:
                    cleanup()
                except BaseException as err:  # noqa: BLE001
                    error = error or err
            with self._cond:
                if error is not None and self._error is None:
                    self._error = error
                self._done += 1
                self._cond.notify_all()


def check_optimizer(optimizer: Optimizer) -> None:
    """Refuse optimizers the layer-by-layer host step cannot run, before anything is allocated."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            "megatrain steps the optimizer layer by layer on the host; LBFGS re-evaluates the closure inside "
            "step() and is not supported. Use a first-order optimizer such as AdamW."
        )


_WAITING = ("zero_grad", "state_dict", "load_state_dict", "add_param_group")


def _waiting_method(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def waiting(self: Any, *args: Any, **kwargs: Any) -> Any:
        wait = getattr(self, "_megatrain_wait", None)
        if wait is not None:
            wait()
        return method(self, *args, **kwargs)

    return waiting


def make_waiting(optimizer: Optimizer, wait: Callable[[], None]) -> None:
    """Make every reader of the optimizer's gradients or state wait for the pending step.

    The optimizer's class is swapped for a subclass (same name) whose ``zero_grad``, ``state_dict``,
    ``load_state_dict`` and ``add_param_group`` wait first, so wrappers that look methods up on the
    class (Lightning's ``LightningOptimizer``) wait too. ``restore_class`` undoes it.
    """
    cls = type(optimizer)
    waiting = type(
        cls.__name__,
        (cls,),
        {"__qualname__": cls.__qualname__, "__module__": cls.__module__, "_megatrain_base": cls}
        | {name: _waiting_method(getattr(cls, name)) for name in _WAITING},
    )
    optimizer.__class__ = waiting
    optimizer._megatrain_wait = wait  # type: ignore[attr-defined]


def restore_class(optimizer: Optimizer) -> None:
    base = type(optimizer).__dict__.get("_megatrain_base")
    if base is not None:
        optimizer.__class__ = base
    optimizer.__dict__.pop("_megatrain_wait", None)


_FUSED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def enable_fused(optimizer: Optimizer) -> bool:
    """Use torch's fused CPU kernel where the user left the implementation choice to torch.

    Only ``fused=None, foreach=None`` is a choice left to torch: an explicit ``foreach=False`` asks for
    the for-loop implementation (which rounds differently from the fused kernel on some CPUs) and is kept.

    Fused CPU AdamW is ~10x faster than the per-tensor loop and computes the same update.
    """
    if type(optimizer).__dict__.get("_megatrain_base", type(optimizer)) not in _FUSED:
        return False
    changed = False
    for group in optimizer.param_groups:
        if group.get("fused") is None and group.get("foreach") is None and not group.get("differentiable"):
            if all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in group["params"]):
                group["fused"] = True
                changed = True
    return changed


def shadow_optimizer(optimizer: Optimizer, groups: list[dict[str, Any]]) -> Optimizer:
    """A second handle on ``optimizer`` sharing its state but stepping only ``groups``.

    The user's optimizer object keeps its own ``param_groups``, so an LR scheduler that changes them
    while a step is in flight changes nothing in it.
    """
    shadow = object.__new__(type(optimizer))
    shadow.__dict__.update(optimizer.__dict__)
    shadow.param_groups = groups
    return shadow


def snapshot_groups(optimizer: Optimizer) -> list[dict[str, Any]]:
    """Hyperparameters of each group as they are now (tensors cloned), without ``params``."""
    out = []
    for group in optimizer.param_groups:
        out.append({k: (v.clone() if isinstance(v, torch.Tensor) else copy.copy(v)) for k, v in group.items() if k != "params"})
    return out


def split_params(optimizer: Optimizer, owner: dict[int, int], n_units: int) -> list[list[list[torch.Tensor]]]:
    """For each unit, each group's params that the unit owns (params the engine does not know go to unit 0)."""
    per_unit: list[list[list[torch.Tensor]]] = [[[] for _ in optimizer.param_groups] for _ in range(n_units)]
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            per_unit[owner.get(id(p), 0)][gi].append(p)
    return per_unit


def step_unit(
    optimizer: Optimizer, hparams: list[dict[str, Any]], params: Iterable[list[torch.Tensor]], kwargs: dict, state: Any = None
) -> None:
    """``state``: the optimizer state to step with instead of the optimizer's own (data parallel: the
    rank's state for the elements it owns)."""
    groups = [{**hp, "params": ps} for hp, ps in zip(hparams, params) if ps]
    if groups:
        shadow = shadow_optimizer(optimizer, groups)
        if state is not None:
            shadow.state = state
        type(optimizer).step(shadow, **kwargs)
