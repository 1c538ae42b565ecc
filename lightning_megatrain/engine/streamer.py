"""The layer stack streamed through the device: slots, prefetch, the forward without a graph, recompute-backward.

Each streamed layer's ``forward`` is replaced by one that makes the layer resident in a device slot
(copied on the H2D stream, ``prefetch`` layers ahead), binds views of the slot as its parameters and
runs it: under grad as one autograd node (``layer_fn.py``) that saves only the layer's inputs, and in
backward recomputes the layer and takes the local gradients, which go home through ``grad_link.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .grad_link import GradLink
from .layer_fn import LayerCall, LayerFunction, strip_caches
from .saved_inputs import SavedInputs
from .stream import Slot, SlotPool, Streams
from .units import Unit


class LayerStreamer:
    """The layer units' device slots and the running of each layer call (implements ``LayerRunner``)."""

    def __init__(
        self, layer_units: list[Unit], place: Any, streams: Streams, link: GradLink, saved: SavedInputs,
        wait_ticket: Callable[[int], None], ticket_done: Callable[[int], bool], prefetch: int, after_last: Callable[[], None],
    ) -> None:
        self.layer_units = layer_units
        self.place, self.streams, self.link, self.saved = place, streams, link, saved
        self.device = streams.device
        self.wait_ticket, self.ticket_done = wait_ticket, ticket_done
        self.prefetch = prefetch
        self.after_last = after_last  # the head and final norm come next
        # a slot is a byte buffer laid out as the units' images (tensors of several dtypes)
        nbytes = place.slot_geometry(layer_units)[0]
        self.slots = SlotPool(prefetch + 1 if nbytes else 0, nbytes, torch.uint8, streams)
        for slot in self.slots.slots:
            place.fit_slot(slot)
        self.anchor = torch.empty(0, device=self.device, requires_grad=True)
        self.forwards: list[tuple[nn.Module, Any]] = []
        # per unit index: this micro-batch's calls whose backward has not run yet (a unit called twice
        # has final gradients only after its second backward)
        self.pending: dict[int, int] = {}

    def new_step(self) -> None:
        self.pending = {}

    def wrap(self, layer: nn.Module, unit: Unit) -> None:
        """Route the layer's calls through the streamer."""
        if getattr(layer, "gradient_checkpointing", False):
            warnings.warn(
                f"{type(layer).__name__} has gradient checkpointing on; megatrain already recomputes every "
                "streamed layer in backward, so it is turned off for these layers to avoid a second recompute.",
                stacklevel=2,
            )
            layer.gradient_checkpointing = False  # type: ignore[assignment]
        previous = layer.__dict__.get("forward")
        fn = layer.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._run_layer(unit, fn, args, kwargs)

        layer.forward = forward
        self.forwards.append((layer, previous))

    def unwrap(self) -> None:
        for layer, previous in self.forwards:
            if previous is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous
        self.forwards = []

    # ----------------------------------------------------------------- residency
    def _acquire(self, unit: Unit, direction: int) -> Slot:
        """Make ``unit`` resident and start copying the next ones in ``direction``."""
        slot = self._load(unit, keep=())
        assert slot is not None
        self._prefetch(unit, direction, slot)
        return slot

    def _prefetch(self, unit: Unit, direction: int, slot: Slot) -> None:
        """Start copying the ``prefetch`` layers after ``unit`` whose host update is done, in order. One
        still being updated stops the prefetch: waiting for it here would hold back ``unit``'s own
        kernels; it is tried again once they are launched, and waited for only when it is needed."""
        kept = [slot]
        idx = unit.index - 1
        for k in range(1, self.prefetch + 1):
            j = idx + direction * k
            if not 0 <= j < len(self.layer_units) or len(kept) >= len(self.slots.slots):
                break
            nxt = self._load(self.layer_units[j], keep=tuple(kept), wait=False)
            if nxt is None:
                break
            kept.append(nxt)

    def _load(self, unit: Unit, keep: tuple, wait: bool = True) -> Slot | None:
        """Residency outlives a step: a layer still in a slot is used again as long as its weights are
        the ones copied (same version; an optimizer step about to change them drops it at launch, as
        fused kernels update in place without bumping versions). ``wait=False``: None where the unit's
        host update is not done yet."""
        slot = self.slots.find(unit)
        if slot is not None and slot.version != unit._version():
            slot.unit = None  # changed in place since the copy (a checkpoint load, user code)
            slot = None
        if slot is None:
            if not wait and not self.ticket_done(unit.ticket):
                return None
            self.wait_ticket(unit.ticket)
            unit.refresh_compute()
        slot = self.slots.load(unit, unit.compute, keep=keep, fill=self.place.slot_fill(unit))
        slot.version = unit._version()
        return slot

    def _views(self, unit: Unit, slot: Slot, grad: bool) -> list[torch.Tensor]:
        views = [unit.param_view(slot.buf, e) for e in unit.entries]
        if grad:
            views = [v.detach().requires_grad_(e.goffset is not None) for v, e in zip(views, unit.entries)]
        return views

    # ----------------------------------------------------------------- forward
    def _run_layer(self, unit: Unit, fn: Any, args: tuple, kwargs: dict) -> Any:
        out = self._run_layer_inner(unit, fn, args, kwargs)
        if unit is self.layer_units[-1]:
            self.after_last()
        return out

    def _run_layer_inner(self, unit: Unit, fn: Any, args: tuple, kwargs: dict) -> Any:
        if torch.is_grad_enabled():
            call = LayerCall(self, unit, fn, *strip_caches(args, kwargs))
            tensors = call.take_tensors()
            if unit.trainable or any(t.requires_grad for t in tensors):
                self.pending[unit.index] = self.pending.get(unit.index, 0) + 1
                outs = LayerFunction.apply(call, self.anchor, *tensors)
                return call.join_output(outs)
        slot = self._acquire(unit, +1)
        self.slots.begin_use(slot)
        try:
            unit.bind(self._views(unit, slot, grad=False))
            out = fn(*args, **kwargs)
        finally:
            unit.unbind()
            self.slots.end_use(slot)
        self._prefetch(unit, +1, slot)  # what was still being updated when this layer started
        return out

    def run_forward(self, call: LayerCall, tensors: Sequence[torch.Tensor]) -> Any:
        unit = call.unit
        slot = self._acquire(unit, +1)
        self.slots.begin_use(slot)
        try:
            unit.bind(self._views(unit, slot, grad=False))
            versions = unit.buffer_versions()
            out = call.call(tensors)
            if unit.buffer_versions() != versions:
                unit.mutates_buffers = True  # e.g. BatchNorm running stats
        finally:
            unit.unbind()
            self.slots.end_use(slot)
        self._prefetch(unit, +1, slot)  # what was still being updated when this layer started
        return out

    def save_inputs(self, call: LayerCall, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        return self.saved.save(call, tensors)

    def restore_inputs(self, call: LayerCall, kept: list[torch.Tensor | None]) -> list[torch.Tensor]:
        return self.saved.restore(call, kept)

    # ----------------------------------------------------------------- backward
    def run_backward(
        self, call: LayerCall, inputs: list[torch.Tensor], wrt: list[torch.Tensor], grad_outputs: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        unit = call.unit
        slot = self._acquire(unit, -1)
        self.slots.begin_use(slot)
        try:
            return self._backward_in_slot(call, unit, slot, inputs, wrt, grad_outputs)
        finally:
            self.slots.end_use(slot)  # also on failure: the slot's next copy must wait for these kernels

    def _backward_in_slot(
        self, call: LayerCall, unit: Unit, slot: Slot, inputs: list[torch.Tensor], wrt: list[torch.Tensor],
        grad_outputs: Sequence[torch.Tensor | None],
    ) -> list[torch.Tensor | None]:
        try:
            weights = self._views(unit, slot, grad=True)
            unit.bind(weights)
            # the recompute must not update buffers a second time (BatchNorm running stats)
            saved = [b.clone() for b in unit.buffers()] if unit.mutates_buffers else None
            with torch.enable_grad(), call.replay_context():
                outs = call.split_output(call.call(inputs))
            call.out_leaves = []
            pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
            trainable = [w for w, e in zip(weights, unit.entries) if e.goffset is not None]
            targets = list(wrt) + trainable
            if pairs and targets:
                grads = torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True)
            else:
                grads = (None,) * len(targets)
            if saved is not None:
                with torch.no_grad():
                    for b, v in zip(unit.buffers(), saved):
                        b.copy_(v)
        finally:
            unit.unbind()
        input_grads = list(grads[: len(wrt)])
        weight_grads = grads[len(wrt) :]
        left = self.pending.get(unit.index, 1) - 1
        self.pending[unit.index] = left
        if unit.trainable:
            channel = self.link.take()
            try:
                with torch.no_grad():
                    trainable_entries = [e for e in unit.entries if e.goffset is not None]
                    dev, produced = self.place.pack_layer(unit, trainable_entries, weight_grads, channel)
                self.link.send(unit, dev, channel.host, produced, release=channel, final=left == 0)
            except BaseException:
                self.link.channels.put(channel)  # send submits last: a failure in it means no task will return it
                raise
        return input_grads
