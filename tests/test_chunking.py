"""Token-wise chunking inside a layer's recompute is exact against unchunked."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from lightning_megatrain.chunking import chunk_tokenwise, unchunk
from models import HFLM, assert_same_training, data, trainer


class ChunkedLlama(HFLM):
    def __init__(self) -> None:
        super().__init__("llama", dropout=0.0)
        for layer in self.model.model.layers:
            chunk_tokenwise(layer.mlp, 3)
            chunk_tokenwise(layer.post_attention_layernorm, 2)


def _fit(make: Any, strategy: str) -> HFLM:
    L.seed_everything(0)
    model = make()
    trainer(strategy, max_steps=3).fit(model, data())
    return model


def test_chunked_mlp_under_megatrain_matches_unchunked_plain() -> None:
    plain = _fit(lambda: HFLM("llama", dropout=0.0), "auto")
    mega = _fit(ChunkedLlama, "megatrain")
    # chunking splits the sum over tokens of each weight gradient, so it is exact up to float rounding
    # (not bit-exact); AdamW turns a ~1e-9 difference in a near-zero gradient into ~1e-6 in a weight,
    # which the default atol=1e-6 rejects on some CPUs' kernels.
    assert_same_training(plain, mega, rtol=1e-4, atol=1e-5)


def test_chunking_saves_only_one_chunk_of_intermediates() -> None:
    """The outer graph keeps no intermediates of a chunked module (at most its input, x.numel()
    elements); the unchunked MLP keeps ~2x its hidden activations. Checking only the largest saved
    tensor passes with every chunk's intermediates kept: this sums them. Guards against the
    per-chunk ``checkpoint()`` being removed (seen red)."""
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    x = torch.randn(2, 32, 8, requires_grad=True)
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full = mlp(x)
    total_full = sum(sizes)
    assert total_full >= 2 * 64 * 64  # the hidden activations (tokens x 64), before and after GELU
    sizes.clear()
    chunk_tokenwise(mlp, 4)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mlp(x)
    torch.testing.assert_close(out, full)
    assert sum(sizes) <= x.numel(), f"the chunked MLP's graph keeps {sum(sizes)} elements (unchunked: {total_full})"
    out.sum().backward()
    g = x.grad.clone()
    x.grad = None
    unchunk(mlp)
    mlp(x).sum().backward()
    torch.testing.assert_close(g, x.grad)
    with pytest.raises(ValueError, match="chunks must be an integer >= 1"):
        chunk_tokenwise(mlp, 0)
