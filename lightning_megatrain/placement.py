"""Where a module's tensors live under megatrain: parameters at home on the host, everything else
(buffers, torchmetrics states, the LightningModule's ``device``) on the compute device.

Lightning's usual ``model_to_device`` is ``module.to(root_device)``, which would move the parameters
too; megatrain's runtime streams those itself. User code that reads ``self.device`` (``torch.arange(...,
device=self.device)``) or updates a metric with device tensors needs the rest on the device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

try:  # torchmetrics is a dependency of Lightning, but stay importable without it
    from torchmetrics import Metric
except ImportError:  # pragma: no cover
    Metric = None  # type: ignore[assignment, misc]


def _move_metric(metric: nn.Module, device: torch.device) -> None:
    if not any(True for _ in metric.parameters()):
        metric.to(device)  # the public path: moves states, defaults, caches and the metric's device
        return
    # A metric with its own network (e.g. FID's feature extractor): the parameters are megatrain's to
    # stream; move only the states, as Metric._apply does for them.
    move = lambda t: t.to(device)  # noqa: E731
    for key, default in metric._defaults.items():
        if isinstance(default, torch.Tensor):
            metric._defaults[key] = move(default)
        value = getattr(metric, key)
        if isinstance(value, torch.Tensor):
            setattr(metric, key, move(value))
        elif isinstance(value, list):
            setattr(metric, key, [move(v) for v in value])
    metric._device = device


def _unhandled(module: nn.Module) -> Iterator[nn.Module]:
    """Submodules in order, not descending into metrics (a metric moves its own children)."""
    yield module
    if Metric is not None and isinstance(module, Metric):
        return
    for child in module.children():
        yield from _unhandled(child)


def place_states(module: nn.Module, device: torch.device) -> None:
    """Move every buffer and metric state of ``module`` to ``device`` and make modules that report a
    device (LightningModules, metrics) report it; parameters (and their gradients) are not touched."""
    device = torch.device(device)
    for m in _unhandled(module):
        if Metric is not None and isinstance(m, Metric):
            _move_metric(m, device)
            continue
        for name, b in m._buffers.items():
            if b is not None and b.device != device:
                m._buffers[name] = b.to(device)
        if "_device" in m.__dict__ and isinstance(m.__dict__["_device"], torch.device):
            m._device = device  # LightningModule (and any module with Lightning's device mixin)
