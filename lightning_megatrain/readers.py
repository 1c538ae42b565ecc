"""Who reads the host gradients between a backward and the optimizer step: when training must wait for the host.

Gradients reach the host on the host worker, in the order they were sent, and the optimizer step
is queued behind them on the same worker, so nothing has to wait for them unless some code on the
training thread reads them. Waiting only then keeps the device busy across micro-batches (a wait
after every backward drains the GPU while the host adds the last layers' gradients).

What reads them, as Lightning calls it: ``on_after_backward`` (every backward), and at the step
boundary ``on_before_optimizer_step``, ``configure_gradient_clipping`` and clipping itself. A hook
counts as a reader when the LightningModule or a callback overrides it; manual optimization runs
user code between ``manual_backward`` and ``step`` that may read anything, so it always waits.
Code that reaches gradients through ``module.parameters()`` waits by itself (``engine.attach.guard``).

Where nothing reads them, the step's host updates start during the backward of its last micro-batch,
each layer as soon as its gradients are final (``Runtime.prepare_step``): ``schedule`` says whether a
run does, and why not.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden


def _overrides(trainer: Any, module: Any, hook: str) -> list[str]:
    """``"Module.hook"``, ``"Callback.hook"`` for each object of the run that overrides ``hook``."""
    out = [f"{type(module).__name__}.{hook}"] if is_overridden(hook, module, parent=pl.LightningModule) else []
    for cb in getattr(trainer, "callbacks", None) or []:
        if is_overridden(hook, cb, parent=pl.Callback):
            out.append(f"{type(cb).__name__}.{hook}")
    return out


def after_backward_readers(module: Any) -> list[str]:
    """What reads the gradients right after each backward (``on_after_backward``); manual optimization:
    the user's code."""
    trainer = module.trainer
    if not module.automatic_optimization:
        return ["manual optimization"]
    return _overrides(trainer, module, "on_after_backward")


def before_step_readers(module: Any) -> list[str]:
    """What reads the gradients of a whole optimizer step before it runs: ``on_before_optimizer_step``,
    a custom ``configure_gradient_clipping``, Lightning's clipping (``gradient_clip_val``)."""
    trainer = module.trainer
    out = _overrides(trainer, module, "on_before_optimizer_step")
    out += _overrides(trainer, module, "configure_gradient_clipping")
    clip = getattr(trainer, "gradient_clip_val", None)
    if clip:
        algorithm = getattr(trainer, "gradient_clip_algorithm", None) or "norm"
        out.append(f"gradient_clip_val={clip} ({getattr(algorithm, 'value', algorithm)})")
    return out


def early_step_blockers(module: Any) -> list[str]:
    """Why the host updates of a step cannot start during its last backward (empty: they can): whatever
    reads gradients between that backward and the step, or could change them, or a user ``backward``."""
    if not module.automatic_optimization:
        return ["manual optimization"]
    out = after_backward_readers(module) + before_step_readers(module)
    if is_overridden("backward", module, parent=pl.LightningModule):
        out.append(f"{type(module).__name__}.backward")
    return out


def schedule(module: Any, early_capable: bool) -> str:
    """The host step's schedule in words, for the memory plan and the logs."""
    if not early_capable:
        return "after backward, overlapped with the next forward (data parallel: gradients are reduced first)"
    blockers = early_step_blockers(module)
    if not blockers:
        return "during the last backward of each step: a layer is updated as soon as its gradients are final"
    return f"after backward, overlapped with the next forward (the step's gradients are read first: {', '.join(blockers)})"
