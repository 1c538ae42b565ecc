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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch.optim import Optimizer

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
    def narrow(optimizer: Optimizer, params: Iterable[torch.Tensor] | None = None) -> None:
        """Round every floating state tensor of ``params`` (default: all) to bf16, in new storage."""
        if params is None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
        for p in params:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if _narrowable(value, p) and value.dtype != HELD_DTYPE:
                    state[key] = value.to(HELD_DTYPE)

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
            # state created by this step (the first one) is fp32 and gets its bf16 storage now
            self.narrow(optimizer, params)
