"""Lean optimizer state: every floating state tensor held in bf16 between steps, widened per layer.

AdamW's two moments are 8 of the 18 bytes per parameter megatrain keeps on the host. Holding them in
bf16 halves that. Any torch optimizer works unchanged: just before a unit is stepped, its parameters'
state tensors are copied into one fp32 scratch buffer (views of it replace them in
``optimizer.state``), the optimizer's own ``step`` runs on fp32 as usual, and the results are rounded
back (round-to-nearest-even) into the bf16 tensors, which replace the scratch views again. At most
``chunk_numel`` parameters' state (the largest streamed layer, or one parameter if it is larger) is
ever fp32: a unit larger than that (the embeddings and head) is stepped in several chunks of whole
parameters, which gives the same update because torch's optimizers update each parameter on its own
(megatrain already steps the model unit by unit on that basis). The scratch is reused chunk after chunk.

Hand-written rather than a torch feature: torch optimizers keep state in the parameter's dtype, and
``Optimizer.load_state_dict`` casts loaded state to it, so the narrowing is re-applied after a load.

The bf16 state lives in anonymous memory mappings of its exact size (one per narrowing: a chunk's worth,
or the whole optimizer's after a load), not in malloc's heap: the first step creates each parameter's state in fp32 and frees it once rounded;
had the long-lived bf16 tensors been placed in the heap between those freed blocks, every layer's fp32
state would have left a hole the next, larger request could not reuse (measured: lean's peak RSS 1.17x
its plan on an 88M-parameter Llama, benchmarks/host_memory.py). Mapped, the bf16 state stays out of the
way and the fp32 blocks of one layer are reused by the next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch.optim import Optimizer

from .host import give_back_heap, mapped

HELD_DTYPE = torch.bfloat16


def _narrowable(value: object, param: torch.Tensor) -> bool:
    """State shaped like its parameter (moments, momentum buffers, Adagrad sums); scalars such as
    Adam's ``step`` stay as they are (they count steps and must stay exact)."""
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dtype in (torch.float32, torch.float64, HELD_DTYPE)
        and value.shape == param.shape
        and value.dim() > 0
    )


class LeanState:
    """Holds floating optimizer state in bf16 and widens one unit's state at a time into a scratch."""

    def __init__(self, chunk_numel: int = 0) -> None:
        self._scratch = torch.empty(0, dtype=torch.float32)
        self.chunk_numel = chunk_numel  # 0: no limit

    def chunks(self, per_group: list[list[torch.Tensor]]) -> Iterator[list[list[torch.Tensor]]]:
        """``per_group`` split into pieces of at most ``chunk_numel`` parameters (whole parameters,
        groups kept apart), in order."""
        if not self.chunk_numel:
            yield per_group
            return
        piece: list[list[torch.Tensor]] = [[] for _ in per_group]
        size = 0
        for gi, params in enumerate(per_group):
            for p in params:
                if size and size + p.numel() > self.chunk_numel:
                    yield piece
                    piece, size = [[] for _ in per_group], 0
                piece[gi].append(p)
                size += p.numel()
        if size or not any(per_group):
            yield piece

    def _scratch_for(self, numel: int) -> torch.Tensor:
        if self._scratch.numel() < numel:
            self._scratch = torch.empty(numel, dtype=torch.float32)
        return self._scratch

    @staticmethod
    def narrow(optimizer: Optimizer, params: Iterable[torch.Tensor] | None = None) -> int:
        """Round every floating state tensor of ``params`` (default: all) to bf16, in one new mapping;
        the number of tensors rounded."""
        if params is None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
        todo = []
        for p in params:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if _narrowable(value, p) and value.dtype != HELD_DTYPE:
                    todo.append((state, key, value))
        if not todo:
            return 0
        held = mapped(sum(v.numel() for _, _, v in todo), HELD_DTYPE)
        offset = 0
        for state, key, value in todo:
            narrow = held[offset : offset + value.numel()].view(value.shape)
            offset += value.numel()
            narrow.copy_(value)  # round to nearest even
            state[key] = narrow
        return len(todo)

    @contextlib.contextmanager
    def widened(self, optimizer: Optimizer, params: list[torch.Tensor]) -> Iterator[None]:
        """Inside: ``params``' state is fp32 (views of the scratch). After: rounded back into bf16."""
        held: list[tuple[dict, str, torch.Tensor]] = []
        need = 0
        for p in params:
            for key, value in optimizer.state.get(p, {}).items():
                if _narrowable(value, p) and value.dtype == HELD_DTYPE:
                    need += value.numel()
        scratch = self._scratch_for(need)
        offset = 0
        for p in params:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in list(state.items()):
                if _narrowable(value, p) and value.dtype == HELD_DTYPE:
                    wide = scratch[offset : offset + value.numel()].view(value.shape)
                    offset += value.numel()
                    wide.copy_(value)
                    state[key] = wide
                    held.append((state, key, value))
        try:
            yield
        finally:
            for state, key, narrow in held:
                narrow.copy_(state[key])  # round to nearest even
                state[key] = narrow
            # state created by this step (the first one) is fp32 and gets its bf16 storage now; freed, the
            # fp32 tensors stay in malloc's heap, split by the small long-lived objects made between them
            # (each parameter's ``step``), so the next chunk cannot reuse them and the heap grows by a
            # chunk's state per chunk (measured: +3 B/param over a 108M-parameter, 30-layer Llama's first
            # step): hand them back to the system at once
            if self.narrow(optimizer, params):
                give_back_heap()
