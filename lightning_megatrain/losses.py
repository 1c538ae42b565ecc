"""Memory-lean losses for language-model heads.

:func:`chunked_linear_cross_entropy` fuses the lm-head projection and the cross-entropy so that the
``tokens x vocab`` logits never exist at once. For a batch of ``B*T`` tokens and a vocabulary of ``V``,
``F.cross_entropy(lm_head(hidden).float(), target)`` allocates the fp32 logits (``B*T*V*4`` bytes:
8 GiB for 64k tokens and a 32k vocabulary), then as much again for the log-softmax saved for backward
and for the gradient of the logits. On a GPU that streams everything else layer by layer this is
often the largest allocation of the whole step. Here the flattened tokens are processed
``chunk_size`` rows at a time; the peak is a few ``chunk_size x V`` buffers plus gradients of the
size of ``hidden`` and ``weight``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["chunked_linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class _Options:
    chunk_size: int
    ignore_index: int
    reduction: str
    softcap: Optional[float]
    compute_dtype: torch.dtype  # dtype of the matmuls (the autocast dtype under autocast)
    softmax_dtype: torch.dtype  # dtype of the logits for softmax and loss (fp32; fp64 for fp64 inputs)
    autocast_off: Optional[str]  # device type whose autocast is switched off inside, when it was on
    needs: tuple[bool, bool, bool]  # hidden, weight, bias need a gradient


def chunked_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int = 4096,
    ignore_index: int = -100,
    reduction: str = "mean",
    logit_softcap: float | None = None,
) -> Tensor:
    """Cross-entropy of a linear head, computed ``chunk_size`` tokens at a time.

    The same value and gradients as::

        logits = F.linear(hidden, weight, bias).flatten(0, -2).float()
        if logit_softcap is not None:
            logits = logit_softcap * torch.tanh(logits / logit_softcap)  # Gemma2's final soft-capping
        F.cross_entropy(logits, target.flatten(), ignore_index=ignore_index, reduction=reduction)

    (``"none"`` returns the per-token losses in ``target``'s shape), without ever allocating the
    ``N x V`` logits of the ``N = hidden.numel() // H`` tokens: ``N*V*4`` bytes are never allocated.
    The working set is ``chunk_size*V*4`` bytes with fp32 matmuls (softmax and its gradient are
    computed in place in one buffer; twice that with ``logit_softcap``), ``chunk_size*V*6`` bytes
    with bf16/fp16 matmuls (the fp32 buffer plus the half-precision logits or logits' gradient),
    on top of the gradients, which are the size of ``hidden`` and ``weight`` (fp32 for ``weight``).

    Args:
        hidden: ``(..., H)`` last hidden states (the lm-head input).
        weight: ``(V, H)`` the lm-head weight (``lm_head.weight``; a tied embedding weight works too).
        target: ``(...)`` int64 class indices, ``hidden.shape[:-1]``; ``ignore_index`` marks tokens
            that contribute neither loss nor gradient.
        bias: optional ``(V,)`` lm-head bias.
        chunk_size: tokens per chunk. Memory is proportional to ``chunk_size * V``; smaller chunks
            mean more, smaller matmuls.
        ignore_index: target value to ignore.
        reduction: ``"mean"`` (over the non-ignored tokens, ``nan`` when all are ignored, as torch),
            ``"sum"`` or ``"none"``.
        logit_softcap: if set, logits become ``cap * tanh(logits / cap)`` before the loss.

    Gradients. For ``"mean"`` and ``"sum"`` the forward pass computes, chunk by chunk, the gradient
    of the loss with respect to the chunk's logits (``softmax - onehot``, scaled by ``1/n_valid``
    for ``"mean"``, zero for ignored tokens) and immediately turns it into the chunk's rows of
    ``grad_hidden`` and into running sums ``grad_weight`` and ``grad_bias``. Only those gradients
    are saved (the size of ``hidden`` and ``weight``), never logits; backward multiplies them by the
    scalar incoming gradient. They are computed only for inputs that require a gradient while grad
    mode is on, so evaluation costs just the forward. For ``"none"`` the incoming gradient is a
    different scale per token, which cannot be applied to a summed ``grad_weight`` afterwards, so
    forward computes the losses only, saves its inputs (no copy), and backward recomputes each
    chunk's logits with the per-token scales (one extra ``N x H x V`` matmul). The result is not
    differentiable twice.

    Dtypes. The matmuls run in the dtype ``F.linear`` would use: under autocast for
    ``hidden.device.type``, fp16/bf16/fp32 inputs are cast to the autocast dtype (fp64 ones are not,
    like autocast); otherwise ``hidden``, ``weight`` and ``bias`` must share one dtype, which is used.
    Each chunk's logits are upcast to fp32 (fp64 inputs stay fp64, where ``.float()`` would
    downcast) and soft-capping, softmax, loss and the logits' gradient are computed in that dtype.
    The logits' gradient is cast back to the matmul dtype for the gradient matmuls, as autograd does
    through ``.float()``; ``grad_weight`` and ``grad_bias`` are summed over chunks in fp32 (fp64 for
    fp64) and every gradient is returned in its input's dtype. The loss is fp32 (fp64 for fp64).
    Soft-capping is applied after the upcast (HF's Gemma2 applies it in the logits' dtype): the same
    in fp32, and more exact under bf16 autocast.

    A non-ignored target outside ``[0, V)`` raises ``IndexError``; checking it synchronizes with the
    device once per call.
    """
    opts = _validate(hidden, weight, target, bias, chunk_size, ignore_index, reduction, logit_softcap)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = target.reshape(-1)
    out_of_range = (t1 != ignore_index) & ((t1 < 0) | (t1 >= weight.shape[0]))
    if bool(out_of_range.any()):
        bad = t1[out_of_range][0].item()
        raise IndexError(f"target {bad} is out of bounds for a vocabulary of {weight.shape[0]} (ignore_index={ignore_index})")
    loss = _ChunkedLinearCrossEntropy.apply(h2, weight, bias, t1, opts)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss


def _validate(
    hidden: Any,
    weight: Any,
    target: Any,
    bias: Any,
    chunk_size: Any,
    ignore_index: Any,
    reduction: Any,
    softcap: Any,
) -> _Options:
    """Every check that can fail, before anything is allocated."""
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a Tensor or None, got {type(bias).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 (tokens per chunk), got {chunk_size!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(repr(r) for r in _REDUCTIONS)}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"logit_softcap must be a finite number > 0 or None, got {softcap!r}")
        softcap = float(softcap)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., H), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {tuple(weight.shape)}")
    H = hidden.shape[-1]
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight is {tuple(weight.shape)} (V, H) but hidden's last dimension is {H}")
    if V < 1:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must have shape ({V},) for weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target must have hidden's shape without its last dimension, {tuple(hidden.shape[:-1])}, got "
            f"{tuple(target.shape)} (shift labels before calling, e.g. hidden[:, :-1] with target[:, 1:])"
        )
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 class indices (use target.long()), got {target.dtype}")
    tensors = [("hidden", hidden), ("weight", weight), ("target", target)] + ([("bias", bias)] if bias is not None else [])
    for name, t in tensors:
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    floats = [("hidden", hidden), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in floats:
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")

    device_type = hidden.device.type
    try:
        autocast = torch.is_autocast_enabled(device_type)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        autocast = False
    if autocast:
        cast = torch.get_autocast_dtype(device_type)
        dtypes = {n: (t.dtype if t.dtype == torch.float64 else cast) for n, t in floats}
    else:
        dtypes = {n: t.dtype for n, t in floats}
    if len(set(dtypes.values())) != 1:
        found = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        where = " under autocast" if autocast else ""
        raise TypeError(f"hidden, weight and bias must have the same dtype{where} (as F.linear requires), got {found}")
    compute = dtypes["hidden"]
    softmax = torch.float64 if compute == torch.float64 else torch.float32
    grad = torch.is_grad_enabled()
    needs = (
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    )
    return _Options(chunk_size, ignore_index, reduction, softcap, compute, softmax, device_type if autocast else None, needs)


def _no_autocast(opts: _Options) -> contextlib.AbstractContextManager:
    # The dtypes are chosen explicitly; autocast must not re-cast inside (also in backward, which may
    # run under an enclosing autocast context).
    if opts.autocast_off is None:
        return contextlib.nullcontext()
    return torch.autocast(opts.autocast_off, enabled=False)


def _chunk_logits(h: Tensor, w: Tensor, b: Optional[Tensor], opts: _Options) -> tuple[Tensor, Optional[Tensor]]:
    """The chunk's (soft-capped) logits in the softmax dtype, in a fresh buffer, and tanh(logits/cap)."""
    logits = F.linear(h.to(opts.compute_dtype), w, b)
    z = logits.to(opts.softmax_dtype)  # a fresh buffer either way: in-place ops below are safe
    del logits
    if opts.softcap is None:
        return z, None
    t = z.div_(opts.softcap).tanh_()
    return t * opts.softcap, t


def _chunk_loss_and_grad(
    h: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, opts: _Options, scale: Optional[Tensor]
) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token loss of one chunk (0 for ignored tokens) and, if ``scale`` is given, the gradient of
    ``sum(scale * loss)`` with respect to the chunk's logits, in the matmul dtype."""
    z, t = _chunk_logits(h, w, b, opts)
    valid = target != opts.ignore_index
    safe = torch.where(valid, target, 0)
    z_target = z.gather(1, safe.unsqueeze(1)).squeeze(1)
    m = z.amax(dim=1, keepdim=True)
    e = z.sub_(m).exp_()  # z is consumed: exp(z - max)
    s = e.sum(dim=1, keepdim=True)
    lse = (m + s.log()).squeeze(1)
    loss = torch.where(valid, lse - z_target, 0.0)
    if scale is None:
        return loss, None
    p = e.div_(s)  # softmax
    p.scatter_add_(1, safe.unsqueeze(1), -valid.to(p.dtype).unsqueeze(1))  # - onehot (valid rows)
    p.mul_(torch.where(valid, scale, 0.0).to(p.dtype).unsqueeze(1))  # 0 for ignored rows, even if scale is inf
    if t is not None:
        p.mul_(t.square_().neg_().add_(1))  # d(cap * tanh(x / cap)) / dx = 1 - tanh^2
    del t
    return loss, p.to(opts.compute_dtype)


class _Accumulator:
    """grad_hidden rows, and grad_weight / grad_bias summed over chunks, for the inputs that need them."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], opts: _Options, needs: tuple[bool, bool, bool]) -> None:
        self.opts = opts
        acc = opts.softmax_dtype  # fp32 (fp64 for fp64)
        self.gh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if needs[0] else None
        self.gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        self.gb = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if needs[2] else None
        self.weight_dtype = weight.dtype
        self.bias_dtype = bias.dtype if bias is not None else None

    def add(self, lo: int, hi: int, d: Tensor, h: Tensor, w: Tensor) -> None:
        if self.gh is not None:
            rows = self.gh[lo:hi]
            if rows.dtype == d.dtype:
                torch.mm(d, w, out=rows)
            else:
                rows.copy_(d @ w)
        if self.gw is not None:
            if self.gw.dtype == d.dtype:
                self.gw.addmm_(d.t(), h)
            else:
                self.gw.add_(d.t() @ h)
        if self.gb is not None:
            self.gb.add_(d.sum(dim=0, dtype=self.gb.dtype))

    def result(self) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        gw = self.gw.to(self.weight_dtype) if self.gw is not None else None
        gb = self.gb.to(self.bias_dtype) if self.gb is not None else None
        return self.gh, gw, gb


def _chunks(n: int, size: int) -> range:
    return range(0, n, size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, opts: _Options) -> Tensor:  # type: ignore[override]
        ctx.opts = opts
        ctx.hidden_shape = hidden.shape
        n, size = hidden.shape[0], opts.chunk_size
        sdt = opts.softmax_dtype
        with _no_autocast(opts):
            w = weight.to(opts.compute_dtype)
            b = bias.to(opts.compute_dtype) if bias is not None else None
            if opts.reduction == "none":
                out = torch.empty(n, dtype=sdt, device=hidden.device)
                for lo in _chunks(n, size):
                    out[lo : lo + size], _ = _chunk_loss_and_grad(hidden[lo : lo + size], w, b, target[lo : lo + size], opts, None)
                ctx.save_for_backward(hidden, weight, bias, target)
                return out

            total = torch.zeros((), dtype=sdt, device=hidden.device)
            scale: Optional[Tensor] = None
            if opts.reduction == "mean":
                n_valid = (target != opts.ignore_index).sum().to(sdt)
                total_scale = 1.0 / n_valid  # inf when every token is ignored; such rows get 0 gradient
            else:
                total_scale = torch.ones((), dtype=sdt, device=hidden.device)
            if any(opts.needs):
                scale = total_scale
                acc = _Accumulator(hidden, weight, bias, opts, opts.needs)
            for lo in _chunks(n, size):
                h = hidden[lo : lo + size].to(opts.compute_dtype)
                loss, d = _chunk_loss_and_grad(h, w, b, target[lo : lo + size], opts, scale)
                total.add_(loss.sum())
                if d is not None:
                    acc.add(lo, lo + h.shape[0], d, h, w)
                del d
            if scale is not None:
                ctx.save_for_backward(*acc.result())
            else:
                ctx.save_for_backward(None, None, None)
            return total * total_scale if opts.reduction == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        opts: _Options = ctx.opts
        if opts.reduction != "none":
            gh, gw, gb = ctx.saved_tensors
            return (
                gh * grad_out if gh is not None else None,
                gw * grad_out if gw is not None else None,
                gb * grad_out if gb is not None else None,
                None,
                None,
            )
        hidden, weight, bias, target = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if not any(needs):
            return None, None, None, None, None
        n, size = hidden.shape[0], opts.chunk_size
        with _no_autocast(opts):
            w = weight.to(opts.compute_dtype)
            b = bias.to(opts.compute_dtype) if bias is not None else None
            acc = _Accumulator(hidden, weight, bias, opts, needs)  # type: ignore[arg-type]
            grad_out = grad_out.reshape(-1)
            for lo in _chunks(n, size):
                h = hidden[lo : lo + size].to(opts.compute_dtype)
                _, d = _chunk_loss_and_grad(h, w, b, target[lo : lo + size], opts, grad_out[lo : lo + size].to(opts.softmax_dtype))
                assert d is not None
                acc.add(lo, lo + h.shape[0], d, h, w)
                del d
        gh, gw, gb = acc.result()
        return gh, gw, gb, None, None
