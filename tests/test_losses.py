"""chunked_linear_cross_entropy against F.cross_entropy(F.linear(...)): values, gradients, dtypes,
errors, a Lightning drop-in under megatrain, and the memory it saves (CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_megatrain.losses import chunked_linear_cross_entropy
from models import BlockLM, assert_same_training, data, trainer

IGNORE = -100


def reference(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *, ignore_index: int = IGNORE,
              reduction: str = "mean", logit_softcap: float | None = None, **_: Any) -> Tensor:
    logits = F.linear(hidden, weight, bias).flatten(0, -2).float()
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    loss = F.cross_entropy(logits, target.flatten(), ignore_index=ignore_index, reduction=reduction)
    return loss.reshape(target.shape) if reduction == "none" else loss


def make_inputs(shape: tuple[int, ...], V: int, H: int, bias: bool, seed: int = 0, dtype: torch.dtype = torch.float32,
                ignore: float = 0.25) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / H**0.5 * 3
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    target = torch.randint(0, V, shape, generator=g)
    target[torch.rand(shape, generator=g) < ignore] = IGNORE
    return hidden, weight, target, b


def loss_and_grads(fn: Callable[..., Tensor], hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None,
                   grad_out: Tensor, **kw: Any) -> tuple[Tensor, list[Tensor]]:
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    h, w, *rest = leaves
    loss = fn(h, w, target, rest[0] if rest else None, **kw)
    (loss * grad_out).sum().backward()
    return loss.detach(), [t.grad for t in leaves]


def assert_close_rel(actual: Tensor, expected: Tensor, rtol: float = 2e-6, what: str = "") -> None:
    """Elementwise within ``rtol`` of the largest magnitude (matmul sums in another order)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


SHAPES = [
    # token shape, V, H, chunk_size
    ((2, 7), 11, 5, 3),     # 14 tokens, chunks of 3: last chunk has 2
    ((13,), 17, 4, 100),    # chunk larger than the token count
    ((3, 4), 10, 6, 4),     # divisible
    ((2, 3, 5), 9, 3, 7),   # more leading dimensions
    ((5,), 6, 2, 1),        # one token per chunk
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,V,H,chunk", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_fp32_values_and_grads_match_torch(reduction: str, shape: tuple[int, ...], V: int, H: int, chunk: int,
                                           bias: bool, softcap: float | None) -> None:
    hidden, weight, target, b = make_inputs(shape, V, H, bias)
    flat = target.view(-1)
    flat[: min(chunk, flat.numel() - 1)] = IGNORE  # the first chunk entirely ignored (one valid token remains)
    flat[-1] = 0
    g = torch.Generator().manual_seed(1)
    grad_out = torch.rand(shape, generator=g) + 0.5 if reduction == "none" else torch.tensor(0.7)
    kw = dict(reduction=reduction, logit_softcap=softcap)
    loss, grads = loss_and_grads(chunked_linear_cross_entropy, hidden, weight, target, b, grad_out, chunk_size=chunk, **kw)
    ref_loss, ref_grads = loss_and_grads(reference, hidden, weight, target, b, grad_out, **kw)
    assert_close_rel(loss, ref_loss, what="loss")
    if reduction == "none":
        assert loss.shape == target.shape
        assert torch.all(loss[target == IGNORE] == 0)
    for name, a, e in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_close_rel(a, e, what=f"grad {name}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n", [0, 9])
def test_all_tokens_ignored_matches_torch(reduction: str, n: int) -> None:
    """'mean' over no token is nan in torch (0/0) with zero gradients; so here; also for no tokens at all."""
    hidden, weight, target, b = make_inputs((n,), 7, 3, True)
    target.fill_(IGNORE)
    grad_out = torch.ones(n) if reduction == "none" else torch.tensor(1.0)
    loss, grads = loss_and_grads(chunked_linear_cross_entropy, hidden, weight, target, b, grad_out, chunk_size=4, reduction=reduction)
    ref_loss, ref_grads = loss_and_grads(reference, hidden, weight, target, b, grad_out, reduction=reduction)
    if reduction == "mean":
        assert torch.isnan(ref_loss) and torch.isnan(loss)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert not a.any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_gradcheck_fp64(reduction: str, softcap: float | None) -> None:
    """fp64 inputs stay fp64 (``.float()`` would drop to fp32), so autograd's gradcheck applies."""
    hidden, weight, target, b = make_inputs((2, 5), 7, 3, True, dtype=torch.float64)
    target[0, :3] = IGNORE
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]

    def fn(h: Tensor, w: Tensor, bias: Tensor) -> Tensor:
        return chunked_linear_cross_entropy(h, w, target, bias, chunk_size=3, reduction=reduction, logit_softcap=softcap)

    assert fn(*leaves).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, leaves)


def test_custom_ignore_index_and_backward_twice() -> None:
    hidden, weight, target, b = make_inputs((4, 6), 9, 5, True, ignore=0.0)
    target[:, ::3] = 4  # ignored class id
    h, w, bias = (t.clone().requires_grad_() for t in (hidden, weight, b))
    loss = chunked_linear_cross_entropy(h, w, target, bias, chunk_size=5, ignore_index=4)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (h, w, bias)]
    loss.backward()  # the saved gradients are not modified by the first backward
    for t, g in zip((h, w, bias), first):
        torch.testing.assert_close(t.grad, 2 * g)
    ref_loss, ref_grads = loss_and_grads(reference, hidden, weight, target, b, torch.tensor(1.0), ignore_index=4)
    assert_close_rel(loss.detach(), ref_loss)
    for a, e in zip(first, ref_grads):
        assert_close_rel(a, e)


def test_only_needed_gradients_and_no_grad_mode() -> None:
    hidden, weight, target, b = make_inputs((3, 5), 8, 4, True)
    h = hidden.clone().requires_grad_()
    loss = chunked_linear_cross_entropy(h, weight, target, b, chunk_size=4)  # frozen head
    loss.backward()
    assert h.grad is not None and weight.grad is None and b.grad is None
    with torch.no_grad():
        loss2 = chunked_linear_cross_entropy(h, weight, target, b, chunk_size=4)
    assert loss2.grad_fn is None
    assert loss2 == pytest.approx(loss.item(), rel=1e-6)
    assert chunked_linear_cross_entropy(hidden, weight, target).grad_fn is None  # nothing requires grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_bf16_autocast_close_to_unchunked_autocast(reduction: str, softcap: float | None) -> None:
    hidden, weight, target, b = make_inputs((4, 37), 300, 64, True, seed=3)
    target[0, :16] = IGNORE
    grad_out = torch.rand(target.shape) + 0.5 if reduction == "none" else torch.tensor(1.0)
    kw = dict(reduction=reduction, logit_softcap=softcap)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(chunked_linear_cross_entropy, hidden, weight, target, b, grad_out, chunk_size=16, **kw)
        ref_loss, ref_grads = loss_and_grads(reference, hidden, weight, target, b, grad_out, **kw)
    assert loss.dtype == torch.float32  # softmax and loss in fp32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for a, e in zip(grads, ref_grads):
        assert a.dtype == torch.float32  # gradients in the inputs' dtype
        assert_close_rel(a, e, rtol=2e-2)
    # the matmul really ran in bf16: far from the fp32 result in a way the reference shares
    fp32_loss, _ = loss_and_grads(reference, hidden, weight, target, b, grad_out, **kw)
    assert (loss - ref_loss).abs().max() < (fp32_loss - ref_loss).abs().max()


def test_bf16_inputs_without_autocast() -> None:
    hidden, weight, target, b = make_inputs((3, 10), 50, 16, True, seed=4, dtype=torch.bfloat16)
    loss, grads = loss_and_grads(chunked_linear_cross_entropy, hidden, weight, target, b, torch.tensor(1.0), chunk_size=8)
    ref_loss, ref_grads = loss_and_grads(reference, hidden, weight, target, b, torch.tensor(1.0))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 softmax
    for a, e in zip(grads, ref_grads):
        assert a.dtype == torch.bfloat16
        assert_close_rel(a.float(), e.float(), rtol=2e-2)


def test_invalid_arguments_fail_before_allocating() -> None:
    # stride-0 inputs that would need ~16 GiB of gradient buffers: each error comes before any of it
    N, H, V = 10**6, 4096, 8
    hidden = torch.zeros(1, 1).expand(N, H)
    weight = torch.zeros(V, H)
    target = torch.zeros(1, dtype=torch.long).expand(N)
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        (dict(chunk_size=0), ValueError, "chunk_size must be an integer >= 1"),
        (dict(chunk_size=2.5), ValueError, "chunk_size must be an integer >= 1"),
        (dict(chunk_size=True), ValueError, "chunk_size must be an integer >= 1"),
        (dict(reduction="avg"), ValueError, "reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
        (dict(logit_softcap=0.0), ValueError, "logit_softcap must be a finite number > 0"),
        (dict(logit_softcap=float("inf")), ValueError, "logit_softcap must be a finite number > 0"),
        (dict(target=target[:-1]), ValueError, r"target must have hidden's shape without its last dimension, \(1000000,\)"),
        (dict(weight=torch.zeros(V, H - 1)), ValueError, r"weight is \(8, 4095\) \(V, H\) but hidden's last dimension is 4096"),
        (dict(weight=torch.zeros(V * H)), ValueError, r"weight must have shape \(V, H\)"),
        (dict(bias=torch.zeros(V + 1)), ValueError, r"bias must have shape \(8,\)"),
        (dict(target=target.float()), TypeError, "target must be int64 class indices"),
        (dict(weight=weight.double()), TypeError, "must have the same dtype"),
        (dict(hidden=torch.zeros(1, 1, dtype=torch.long).expand(N, H)), TypeError, "hidden must be a floating-point"),
        (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
        (dict(hidden=torch.zeros(())), ValueError, "0-d"),
    ]
    for overrides, exc, match in cases:
        kw: dict[str, Any] = dict(hidden=hidden.requires_grad_(), weight=weight, target=target, chunk_size=4)
        kw.update(overrides)
        with pytest.raises(exc, match=match):
            chunked_linear_cross_entropy(**kw)
    with pytest.raises(IndexError, match="target 8 is out of bounds for a vocabulary of 8"):
        chunked_linear_cross_entropy(torch.zeros(3, 2), torch.zeros(V, 2), torch.tensor([0, IGNORE, 8]))


# ------------------------------------------------------------------ Lightning drop-in


class HeadLoss(BlockLM):
    """BlockLM with its loss from the chunked helper, or from the unchunked F.cross_entropy."""

    def __init__(self, chunked: bool, tied: bool = False) -> None:
        super().__init__(tied=tied)
        self.chunked = chunked

    def loss(self, batch: Any) -> Tensor:
        idx = batch[0]
        x = self.emb(idx) * self.gain
        mask = torch.ones(idx.shape, device=idx.device)
        for block in self.blocks:
            x = block(x, scale=0.5, mask=mask)
        hidden, target = self.norm(x)[:, :-1], idx[:, 1:].clone()
        target[:, :3] = IGNORE  # e.g. prompt tokens
        if self.chunked:
            return chunked_linear_cross_entropy(hidden, self.head.weight, target, chunk_size=7)
        return F.cross_entropy(self.head(hidden).flatten(0, 1).float(), target.flatten())


@pytest.mark.parametrize("tied", [False, True])
def test_drop_in_under_megatrain_matches_unchunked_plain_lightning(tied: bool) -> None:
    runs = []
    for strategy, chunked in (("auto", False), ("megatrain", True)):
        L.seed_everything(0)
        model = HeadLoss(chunked, tied=tied)
        trainer(strategy, max_steps=4).fit(model, data())
        runs.append(model)
    plain, mega = runs
    assert len(mega.losses) == 4
    assert_same_training(plain, mega, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ memory


def _peak_tensor_bytes(fn: Callable[[], None]) -> int:
    """The most bytes of tensor storage ``fn`` itself created that were alive at once, forward and
    backward alike.

    Every operator's outputs are seen through a ``TorchDispatchMode``: a storage none of the operator's
    inputs had (not a view, not an in-place result) counts from its creation until it is freed. This
    measures ``fn``'s own tensors whatever ran earlier in the process; an RSS high-water mark also moves
    with the pages the allocator kept or returned from earlier tests (seen: 64 MiB against a 62.5 MiB
    bound inside the full suite, 20 MiB alone)."""
    import threading
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    lock = threading.Lock()
    live: dict[int, int] = {}
    state = {"now": 0, "peak": 0}

    def release(ptr: int) -> None:
        with lock:
            state["now"] -= live.pop(ptr, 0)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
            for t in tree_leaves(out):
                if not isinstance(t, Tensor):
                    continue
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                with lock:
                    if not nbytes or ptr in inputs or ptr in live:
                        continue
                    live[ptr] = nbytes
                    state["now"] += nbytes
                    state["peak"] = max(state["peak"], state["now"])
                weakref.finalize(storage, release, ptr)
            return out

    with Count():
        fn()
    return state["peak"]


def test_chunked_peak_memory_is_a_fraction_of_the_logits() -> None:
    N, V, H, chunk = 2048, 32000, 16, 128
    logits_bytes = N * V * 4  # 250 MiB
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 4).requires_grad_()
    target = torch.randint(0, V, (N,), generator=g)

    def run(chunked: bool) -> Callable[[], None]:
        def step() -> None:
            hidden.grad = weight.grad = None
            if chunked:
                loss = chunked_linear_cross_entropy(hidden, weight, target, chunk_size=chunk)
            else:
                loss = F.cross_entropy(F.linear(hidden, weight).float(), target)
            loss.backward()
        return step

    chunked = _peak_tensor_bytes(run(True))
    plain = _peak_tensor_bytes(run(False))
    mib = 2**20
    print(f"peak tensor bytes: chunked {chunked / mib:.1f} MiB, unchunked {plain / mib:.1f} MiB, logits {logits_bytes / mib:.0f} MiB")
    assert plain > logits_bytes  # the measurement sees the logits
    # about one chunk's fp32 logits (chunk*V*4 = 15.6 MiB) and their softmax, plus the gradients of hidden and weight (2.1 MiB)
    assert chunked < logits_bytes / 4
