"""Token-wise work over sequence chunks, for long context.

At long context a layer's own activations (the MLP's B×T×4H intermediate, norms) can fill the GPU
during its recompute in backward. A token-wise submodule gives the same result on any split of the
sequence, so it can run chunk by chunk; under autograd each chunk is checkpointed, so only one chunk's
intermediates exist at a time (in megatrain's recompute and in plain training alike).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def chunk_tokenwise(module: nn.Module, chunks: int, dim: int = 1) -> nn.Module:
    """Make ``module`` (token-wise: MLP, norm; no randomness, no mixing across tokens) process its first
    argument in ``chunks`` pieces along ``dim``. Exact against the unchunked module up to float rounding.

    Use it on each layer's MLP: ``for layer in model.model.layers: chunk_tokenwise(layer.mlp, 8)``.
    ``unchunk(module)`` restores it. Returns ``module``.
    """
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
    unchunk(module)
    fn = module.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if chunks == 1 or x.dim() <= dim or x.shape[dim] < 2:
            return fn(x, *args, **kwargs)
        pieces = x.chunk(chunks, dim)
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))
        if grad:
            outs = [checkpoint(fn, piece, *args, use_reentrant=False, **kwargs) for piece in pieces]
        else:
            outs = [fn(piece, *args, **kwargs) for piece in pieces]
        return torch.cat(outs, dim)

    module.forward = forward  # type: ignore[method-assign]
    module._megatrain_chunked = chunks  # type: ignore[assignment]
    return module


def unchunk(module: nn.Module) -> nn.Module:
    if "_megatrain_chunked" in module.__dict__:
        del module.__dict__["forward"]
        del module.__dict__["_megatrain_chunked"]
    return module
