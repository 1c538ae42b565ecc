"""The one-pass host update (engine/one_pass.py): chunked fused kernels give bit for bit what the
optimizer's own step over whole parameters gives, in every host-memory mode, with the last
micro-batch's gradient added inside the pass or before it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_megatrain.engine import Runtime, RuntimeConfig, one_pass
from lightning_megatrain.engine.one_pass import ALIGN, CHUNK, chunks

CPU = torch.device("cpu")


class Wide(nn.Module):
    """Layers larger than one chunk, with sizes that are no multiple of anything, and a non-layer
    matrix (a head) and vector around them."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(333))
        self.layers = nn.ModuleList([nn.Linear(300, 333) for _ in range(3)])
        self.head = nn.Linear(333, 401, bias=False)


def test_chunks_cover_every_element_once_cut_only_at_aligned_offsets() -> None:
    numels = [5, CHUNK * 2 + 77, 3, CHUNK - 1, ALIGN * 3, 1]
    seen = [torch.zeros(n, dtype=torch.int32) for n in numels]
    for piece in chunks(numels):
        assert 0 < sum(b - a for _, a, b in piece) <= CHUNK
        for i, a, b in piece:
            assert a % ALIGN == 0 and (b == numels[i] or b % ALIGN == 0)
            seen[i][a:b] += 1
    assert all(bool((s == 1).all()) for s in seen)


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "adam-amsgrad-groups": lambda m: torch.optim.Adam(
        [{"params": m.layers.parameters(), "lr": 3e-3}, {"params": [m.scale, *m.head.parameters()]}],
        lr=1e-2, weight_decay=0.01, amsgrad=True,
    ),
    "adamw-tensor-lr": lambda m: torch.optim.AdamW(m.parameters(), lr=torch.tensor(2e-3), betas=(0.8, 0.95)),
    "sgd-nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
}


def _train(mode: str, make: Callable[[nn.Module], torch.optim.Optimizer], chunked: bool, in_pass: bool,
           monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list, list, int]:
    """Three optimizer steps of two micro-batches each with fixed gradients; the last micro-batch's
    gradient added before the step (``in_pass=False``) or inside it. Returns the parameters, the
    optimizer state, the streamed images and how many chunked passes ran."""
    calls = [0]
    real = one_pass._chunked

    def counting(*args: object) -> None:
        calls[0] += 1
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(one_pass, "_chunked", counting)
    monkeypatch.setattr(one_pass, "USE_CHUNKS", True)  # off by default (measured slower on 2 cores)
    if not chunked:
        monkeypatch.setattr(one_pass, "kernel_for", lambda *a: None)
    torch.manual_seed(0)
    model = Wide()
    rt = Runtime(model, CPU, torch.bfloat16, RuntimeConfig(host_memory=mode))
    try:
        opt = make(model)
        rt.attach_optimizer(opt)
        gen = torch.Generator().manual_seed(1)
        for step in range(3):
            opt.zero_grad()
            for mb in range(2):
                if mb == 1 and in_pass:
                    rt.host.prepare(opt, {})  # the last micro-batch: each unit updated as its gradients arrive
                for u in rt.units:
                    if not u.trainable:
                        continue
                    src = torch.randn(u.gnumel, generator=gen).to(rt.compute_dtype)
                    produced = [True] * sum(1 for e in u.entries if e.goffset is not None)
                    update = rt.host.early(u) if mb == 1 and in_pass else None
                    if update is not None:
                        rt.worker.submit(lambda update=update, src=src, produced=produced: update(src, produced))
                    else:
                        rt.worker.submit(lambda u=u, src=src, produced=produced: u.accumulate(src, produced))
            rt.host.step(opt, {})
            rt.wait()
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        state = [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in model.parameters()]
        images = [u.param_view(u.compute, e).clone() for u in rt.units for e in u.entries]  # padding excluded
        return {"params": params, "grads": grads}, state, images, calls[0]
    finally:
        rt.detach()


@pytest.mark.parametrize("mode", ["fast", "compact", "lean"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_chunked_update_is_bitwise_the_optimizers_own_step(mode: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        ref = _train(mode, OPTIMIZERS[name], chunked=False, in_pass=False, monkeypatch=m)
    for in_pass in (False, True):
        with monkeypatch.context() as m:
            got = _train(mode, OPTIMIZERS[name], chunked=True, in_pass=in_pass, monkeypatch=m)
        assert got[3] > 0, "the chunked path never ran"
        for kind in ("params", "grads"):
            for n, t in ref[0][kind].items():
                assert torch.equal(got[0][kind][n], t), (kind, n, in_pass)
        for a, b in zip(ref[1], got[1]):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (k, in_pass)
        for a, b in zip(ref[2], got[2]):
            assert torch.equal(a, b), in_pass
