"""The memory plan: what megatrain will allocate, computed before it allocates anything."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch import nn
from torch.optim import Optimizer

GiB = 1024**3


class MemoryPlanError(MemoryError):
    """The plan does not fit this machine; raised before anything is allocated."""


def optimizer_state_bytes(optimizer: Optimizer | None) -> int:
    """Bytes of optimizer state per trainable fp32 parameter (a conservative guess for unknown optimizers)."""
    if optimizer is None:
        return 0
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        amsgrad = any(g.get("amsgrad") for g in optimizer.param_groups)
        return 12 if amsgrad else 8
    if isinstance(optimizer, torch.optim.SGD):
        return 4 if any(g.get("momentum") for g in optimizer.param_groups) else 0
    return 8


def _fmt(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class MemoryPlan:
    """Bytes megatrain needs on the host and the device, and what this machine has."""

    n_layers: int
    params: int
    trainable: int
    host: dict[str, int] = field(default_factory=dict)
    device: dict[str, int] = field(default_factory=dict)
    host_in_use: int = 0  # bytes the parameters occupy already (moved, not copied)
    host_available: int = 0
    device_free: int | None = None

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def host_needed(self) -> int:
        """New host bytes: the total less what the parameters hold now."""
        return max(0, self.host_total - self.host_in_use)

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    def fits(self) -> bool:
        return self.host_needed <= self.host_available and (self.device_free is None or self.device_total <= self.device_free)

    def check(self) -> None:
        if self.host_needed > self.host_available:
            raise MemoryPlanError(
                f"megatrain needs {self.host_needed} bytes ({_fmt(self.host_needed)}) more host memory "
                f"({self.host_total} bytes in all, {self.host_in_use} already held by the parameters) but "
                f"{self.host_available} bytes ({_fmt(self.host_available)}) are available.\n{self}\nUse a machine with more RAM, a "
                "smaller model, or an optimizer with less state; check_memory=False skips this check."
            )
        if self.device_free is not None and self.device_total > self.device_free:
            raise MemoryPlanError(
                f"megatrain needs {self.device_total} bytes ({_fmt(self.device_total)}) of device memory but "
                f"{self.device_free} bytes ({_fmt(self.device_free)}) are free.\n{self}\nLower prefetch or the batch size."
            )

    def __str__(self) -> str:
        rows = [f"megatrain memory plan: {self.params:,} parameters ({self.trainable:,} trainable), {self.n_layers} streamed layers"]
        rows.append("  host (pinned when a GPU is used):")
        rows += [f"    {k:<32}{_fmt(v):>12}" for k, v in self.host.items()]
        rows.append(
            f"    {'total':<32}{_fmt(self.host_total):>12}  (available now: {_fmt(self.host_available)} "
            f"+ {_fmt(self.host_in_use)} held by the parameters)"
        )
        if "saved layer inputs" in self.device:
            rows.append("  device:")
        else:
            rows.append("  device (before activations; pass plan_batch_tokens to include them):")
        rows += [f"    {k:<32}{_fmt(v):>12}" for k, v in self.device.items()]
        free = "not checked (CPU)" if self.device_free is None else _fmt(self.device_free)
        rows.append(f"    {'total':<32}{_fmt(self.device_total):>12}  (free now: {free})")
        rows.append(f"  fits: {'yes' if self.fits() else 'NO'}")
        return "\n".join(rows)


def _hidden_size(module: nn.Module, layers: Sequence[nn.Module]) -> int | None:
    for m in module.modules():
        size = getattr(getattr(m, "config", None), "hidden_size", None)
        if isinstance(size, int):
            return size
    for layer in layers[:1]:
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                return m.in_features
    return None


def plan_memory(
    module: nn.Module,
    layers: Sequence[nn.Module],
    compute_dtype: torch.dtype,
    device: torch.device,
    prefetch: int = 1,
    optimizers: Iterable[Optimizer] = (),
    grads: bool = True,
    batch_tokens: int | None = None,
    hidden_size: int | None = None,
    grad_channels: int | None = None,
) -> MemoryPlan:
    """The plan for streaming ``layers`` of ``module``; a public function so users can call it before a long load.

    With ``batch_tokens`` (tokens per micro-batch) the device part includes the saved layer inputs
    (``layers x tokens x hidden`` in the compute dtype) and an estimate of one layer's working set
    (``~16 x tokens x hidden`` activations plus the layer's weight gradients). ``hidden_size`` is read
    from an HF config or the first layer's first ``nn.Linear`` when not given.
    """
    layer_numels, layer_trainable = [], []
    layer_ids: set[int] = set()
    for layer in layers:
        ps = list({id(p): p for p in layer.parameters()}.values())
        layer_ids.update(id(p) for p in ps)
        layer_numels.append(sum(p.numel() for p in ps))
        layer_trainable.append(sum(p.numel() for p in ps if p.requires_grad and grads))
    all_params = list({id(p): p for p in module.parameters()}.values())
    outer = [p for p in all_params if id(p) not in layer_ids]
    outer_numel = sum(p.numel() for p in outer)
    outer_trainable = sum(p.numel() for p in outer if p.requires_grad and grads)
    params = sum(layer_numels) + outer_numel
    trainable = sum(layer_trainable) + outer_trainable
    csize = _size(compute_dtype)
    state = max((optimizer_state_bytes(o) for o in optimizers), default=0) if grads else 0
    n_slots = prefetch + 1
    n_channels = grad_channels if grad_channels is not None else 2
    host = {
        "fp32 master weights": 4 * params,
        "fp32 gradients": 4 * trainable,
        "optimizer state (estimate)": state * trainable,
        "gradient staging": 4 * outer_trainable + n_channels * csize * max(layer_trainable, default=0),
    }
    if compute_dtype != torch.float32:
        host[f"{str(compute_dtype).removeprefix('torch.')} compute copies"] = csize * (sum(layer_numels) + outer_numel)
    dev = {
        "weight slots": n_slots * csize * max(layer_numels, default=0),
        "gradient buffers": n_channels * csize * max(layer_trainable, default=0),
        # fp32 leaves (+ the compute-dtype copy they are cast from), their gradients and packed gradients
        "non-layer params and grads": 4 * outer_numel + (csize * outer_numel if csize != 4 else 0) + 8 * outer_trainable,
    }
    if batch_tokens:
        hidden = hidden_size or _hidden_size(module, layers)
        if hidden:
            dev["saved layer inputs"] = len(layers) * batch_tokens * hidden * csize
            dev["one layer's working set (est.)"] = 16 * batch_tokens * hidden * csize + csize * max(layer_trainable, default=0)
    device = torch.device(device)
    device_free = None
    if device.type == "cuda":
        device_free = torch.cuda.mem_get_info(device)[0]
    return MemoryPlan(
        n_layers=len(layers),
        params=params,
        trainable=trainable,
        host=host,
        device=dev,
        host_in_use=4 * params,
        host_available=psutil.virtual_memory().available,
        device_free=device_free,
    )


def anonymous_rss() -> int:
    """This process's anonymous resident memory: what a copy in RAM costs. File-backed pages (the
    memory-mapped checkpoint shards) are page cache and not counted. Falls back to RSS off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


class HostMemoryPeak:
    """Context manager sampling :func:`anonymous_rss` on a thread; ``extra`` is the peak above the start.

    Used by the tests and benchmarks that check a save or load adds about one shard, not a model copy.
    """

    def __init__(self, interval_s: float = 0.0005) -> None:
        self.interval_s = interval_s
        self.base = self.peak = 0

    def __enter__(self) -> "HostMemoryPeak":
        import threading

        self.base = self.peak = anonymous_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-memory-peak", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anonymous_rss())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def peak_rss_growth(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn``; return its result and the peak resident memory above the level before it, in bytes
    (Linux: the kernel's exact high-water mark, reset first; elsewhere: sampled by :class:`HostMemoryPeak`)."""
    import re
    from pathlib import Path

    status = Path("/proc/self/status")

    def read(key: str) -> int:
        match = re.search(rf"^{key}:\s+(\d+) kB", status.read_text(), re.M)
        if match is None:
            raise OSError(f"no {key} in {status}")
        return int(match.group(1)) * 1024

    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = read("VmRSS")
    except OSError:
        with HostMemoryPeak() as peak:
            out = fn()
        return out, peak.extra
    out = fn()
    return out, read("VmHWM") - base
