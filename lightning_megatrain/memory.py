"""The memory plan: what megatrain will allocate, computed before it allocates anything."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch import nn
from torch.optim import Optimizer

from .engine.units import image_layout, stream_dtypes

GiB = 1024**3

HOST_MEMORY_MODES = ("auto", "fast", "compact", "lean")

# Step-time model estimates (shared/DESIGN.md); benchmarks/limits.py measures both on a GPU machine.
PCIE_H2D_BYTES_PER_S = 50e9  # pinned host-to-device copies, PCIe Gen5 x16
DENSE_FLOPS_PER_S = 800e12  # H100 bf16 dense matmul, measured
# Setup estimate: bytes written into new host arenas per second, reading warm safetensors files (first
# touch of the memory included, page-locking not): benchmarks/setup.py on the 2-core CI VM, 1.1B Llama,
# "fast" (the slower mode there; RESULTS.md), the only machine it has run on. A GPU server is not measured.
SETUP_BYTES_PER_S = 1.4e9


def hidden_tokens(stream_bytes_per_param: float, flops: float = DENSE_FLOPS_PER_S, h2d: float = PCIE_H2D_BYTES_PER_S) -> int:
    """Tokens per micro-batch from which copying a layer in takes no longer than its forward.

    Forward is the tightest phase: 2 FLOPs per parameter and token against ``stream_bytes_per_param``
    over PCIe (backward has 6 FLOPs per parameter and token for the same bytes). With the bf16 host
    copy (2 B/param) that is ~16k tokens on an H100 at peak; streaming fp32 masters (4 B/param), ~32k.
    """
    return int(math.ceil(stream_bytes_per_param * flops / (2 * h2d)))


def choose_host_memory(
    requested: str, device: torch.device | str, compute_dtype: torch.dtype, batch_tokens: int | None = None
) -> tuple[str, str]:
    """The host memory mode to use and why: ``"compact"`` wherever it costs no time, else ``"fast"``.

    On a GPU that is from ~16k tokens per micro-batch (``hidden_tokens(2)``): the layer copies are
    hidden behind compute there and the host optimizer is the bound; without ``batch_tokens`` (or
    below) small micro-batches could be transfer-bound, where half the PCIe bytes matter more."""
    if requested not in HOST_MEMORY_MODES:
        raise ValueError(f"host_memory must be one of {', '.join(repr(m) for m in HOST_MEMORY_MODES)}, got {requested!r}")
    if requested != "auto":
        return requested, "chosen by the host_memory option"
    if compute_dtype == torch.float32:
        return "compact", "fp32 precision streams the fp32 masters anyway (no compute copy to drop)"
    if torch.device(device).type != "cuda":
        return "compact", "no PCIe on this device: streaming the fp32 masters costs no time and saves 2 B/param"
    # From the tokens that hide the bf16 copy on, the host's optimizer step, not PCIe, bounds a step, and
    # dropping the copy also drops its re-cast after every update: measured on an H200 at 16k tokens
    # (1.1B Llama, no accumulation), "compact" ran 1.17x the tokens/s of "fast" (benchmarks/RESULTS.md).
    need = hidden_tokens(2)
    if batch_tokens is not None and batch_tokens >= need:
        return "compact", (
            f"plan_batch_tokens={batch_tokens} >= {need}: the weight copies hide behind compute and the host step "
            "is the bound, which the fp32 stream shortens (no re-cast after each update)"
        )
    return "fast", (
        f"a bf16 copy is streamed (2 B/param per pass), since the tokens per micro-batch are unknown or few; with "
        f">= {need} tokens per micro-batch (plan_batch_tokens) host_memory='compact' saves 2 B/param and host time"
    )


class MemoryPlanError(MemoryError):
    """The plan does not fit this machine; raised before anything is allocated."""


def optimizer_state_bytes(optimizer: Optimizer | None) -> int:
    """Bytes of optimizer state per trainable fp32 parameter (a conservative guess for unknown optimizers)."""
    if optimizer is None:
        return 0
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        amsgrad = any(g.get("amsgrad") for g in optimizer.param_groups)
        return 12 if amsgrad else 8
    if isinstance(optimizer, torch.optim.SGD):
        return 4 if any(g.get("momentum") for g in optimizer.param_groups) else 0
    return 8


def _fmt(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class MemoryPlan:
    """Bytes megatrain needs on the host and the device, and what this machine has."""

    n_layers: int
    params: int
    trainable: int
    host: dict[str, int] = field(default_factory=dict)
    device: dict[str, int] = field(default_factory=dict)
    host_in_use: int = 0  # bytes the parameters occupy already (moved, not copied)
    host_available: int = 0
    device_free: int | None = None
    host_memory: str = "fast"
    host_memory_reason: str = ""
    host_step: str = ""  # when the host optimizer step runs and why (the glue fills it in: it knows the hooks)
    layer_params: int = 0  # parameters of the streamed layers
    layer_trainable: int = 0  # of which trainable
    stream_bytes: int = 0  # bytes one pass over the layers copies to the device (all layer images)
    grad_bytes: int = 0  # bytes of layer gradients copied back per micro-batch
    # data parallel (``ranks_per_node * nodes > 1``): ``host`` is then the whole node's need, made of
    # ``host_shared`` (one copy per node, in shared memory) and ``ranks_per_node`` times ``host_private``;
    # ``device``, ``stream_bytes`` and ``grad_bytes`` are one rank's (its 1/N of every layer over PCIe).
    ranks_per_node: int = 1
    nodes: int = 1
    host_shared: dict[str, int] = field(default_factory=dict)  # per node, in ``shm_dir``
    host_private: dict[str, int] = field(default_factory=dict)  # per rank
    shm_dir: str = ""
    shm_free: int | None = None  # free bytes in ``shm_dir`` (None: not checked, e.g. planning another machine)
    gather_bytes: int = 0  # per rank and micro-batch over the GPU interconnect: all-gather and reduce-scatter
    internode_bytes: int = 0  # per rank and micro-batch between nodes: all-reduce of its gradient shards
    # setup: bytes written into the arenas (fp32 masters or frozen weights, the compute copies), per node;
    # bytes page-locked when a GPU is used (what crosses PCIe: the streamed image, gradient staging), per rank
    setup_bytes: int = 0
    pinned_bytes: int = 0

    def setup_seconds(self, bytes_per_s: float = SETUP_BYTES_PER_S) -> float:
        """An estimate of setup's time: the bytes it writes into the arenas at ``bytes_per_s`` (page-locking,
        building the model and Lightning's own setup not included)."""
        return self.setup_bytes / bytes_per_s

    def transfer_bytes(self) -> int:
        """Bytes over the host link per micro-batch: every layer's weights twice (forward, then the
        recompute in backward), and the trainable layer parameters' gradients back."""
        return 2 * self.stream_bytes + self.grad_bytes

    def tokens_to_hide_transfers(self, link_bytes_s: float = PCIE_H2D_BYTES_PER_S, device_flops: float = DENSE_FLOPS_PER_S) -> int:
        """Tokens per micro-batch from which the layer compute (forward 2N, recompute 2N, input
        gradients 2N and weight gradients 2N_trainable FLOPs per token) outlasts the transfers.

        Defaults: ~50 GB/s per direction of pinned PCIe 5 x16, ~800 dense bf16 TFLOPS (H100)."""
        flops_per_token = 6 * self.layer_params + 2 * self.layer_trainable
        if not flops_per_token:
            return 0
        seconds = self.transfer_bytes() / link_bytes_s
        return int(seconds * device_flops / flops_per_token + 0.5)

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def host_needed(self) -> int:
        """New host bytes: the total less what the parameters hold now."""
        return max(0, self.host_total - self.host_in_use)

    @property
    def host_bytes_per_param(self) -> float:
        """Host bytes of training state per parameter (the figure each host_memory mode is known by)."""
        return self.host_total / max(self.params, 1)

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def data_parallel(self) -> bool:
        return self.ranks_per_node * self.nodes > 1

    @property
    def shm_needed(self) -> int:
        """Bytes of the node's shared host state: what ``shm_dir`` must have room for (data parallel)."""
        return sum(self.host_shared.values())

    @property
    def host_private_per_rank(self) -> int:
        """Host bytes each rank holds in its own memory (data parallel)."""
        return sum(self.host_private.values())

    def _shm_fits(self) -> bool:
        return not self.data_parallel or self.shm_free is None or self.shm_needed <= self.shm_free

    def fits(self) -> bool:
        return (
            self.host_needed <= self.host_available
            and (self.device_free is None or self.device_total <= self.device_free)
            and self._shm_fits()
        )

    def check(self) -> None:
        if self.host_needed > self.host_available:
            where = ""
            if self.data_parallel:
                where = (
                    f" per node ({_fmt(self.shm_needed)} shared by the node's {self.ranks_per_node} ranks, "
                    f"{self.ranks_per_node} x {_fmt(self.host_private_per_rank)} private to each rank)"
                )
            raise MemoryPlanError(
                f"megatrain needs {self.host_needed} bytes ({_fmt(self.host_needed)}) more host memory{where} "
                f"({self.host_total} bytes in all, {self.host_in_use} already held by the parameters) but "
                f"{self.host_available} bytes ({_fmt(self.host_available)}) are available.\n{self}\nUse a machine with more RAM, a "
                "smaller model, or an optimizer with less state; check_memory=False skips this check."
            )
        if not self._shm_fits():
            assert self.shm_free is not None
            raise MemoryPlanError(
                f"megatrain's shared host state ({self.shm_needed} bytes, {_fmt(self.shm_needed)}: one copy per node, "
                f"mapped by its {self.ranks_per_node} ranks) must fit in {self.shm_dir}, which has {self.shm_free} bytes "
                f"({_fmt(self.shm_free)}) free.\n{self}\nMount a larger /dev/shm (e.g. `mount -o remount,size=<GiB>G "
                "/dev/shm`; in a container, `docker run --shm-size`) or set MEGATRAIN_SHM_DIR to a RAM-backed directory "
                "(tmpfs) with room; check_memory=False skips this check."
            )
        if self.device_free is not None and self.device_total > self.device_free:
            per = " per GPU" if self.data_parallel else ""
            raise MemoryPlanError(
                f"megatrain needs {self.device_total} bytes ({_fmt(self.device_total)}) of device memory{per} but "
                f"{self.device_free} bytes ({_fmt(self.device_free)}) are free.\n{self}\nLower prefetch or the batch size."
            )

    def __str__(self) -> str:
        rows = [f"megatrain memory plan: {self.params:,} parameters ({self.trainable:,} trainable), {self.n_layers} streamed layers"]
        n = self.ranks_per_node
        if self.data_parallel:
            rows.append(
                f"  data parallel: {_count(self.nodes, 'node')} x {_count(n, 'rank')} (GPUs) per node; the ranks of a node share one copy of the "
                f"host state, each owns 1/{n} of every layer{'; nodes are replicas' if self.nodes > 1 else ''}"
            )
        if self.host_memory_reason:
            rows.append(f"  host_memory={self.host_memory!r}: {self.host_memory_reason}")
        if self.host_step:
            rows.append(f"  host optimizer step: {self.host_step}")
        dp = self.data_parallel
        if dp:
            rows.append(
                f"  host per node ({self.host_bytes_per_param:.1f} B/param; with a GPU each rank page-locks {_fmt(self.pinned_bytes)}, "
                "its share of what crosses PCIe):"
            )
            rows.append(f"    shared by the node's {_count(n, 'rank')}, one copy in {self.shm_dir or 'shared memory'}:")
            rows += [f"      {k:<30}{_fmt(v):>12}" for k, v in self.host_shared.items()]
            free = "not checked" if self.shm_free is None else _fmt(self.shm_free)
            rows.append(f"      {'shared, per node':<30}{_fmt(self.shm_needed):>12}  (free there now: {free})")
            rows.append("    private to each rank:")
            rows += [f"      {k:<30}{_fmt(v):>12}" for k, v in self.host_private.items()]
            rows.append(
                f"      {'private, per rank':<30}{_fmt(self.host_private_per_rank):>12}  "
                f"(x {n} = {_fmt(n * self.host_private_per_rank)} per node)"
            )
        else:
            rows.append(
                f"  host ({self.host_bytes_per_param:.1f} B/param; {_fmt(self.pinned_bytes)} of it page-locked with a GPU: "
                "the streamed image and staging):"
            )
            rows += [f"    {k:<32}{_fmt(v):>12}" for k, v in self.host.items()]
        rows.append(
            f"    {'total per node' if dp else 'total':<32}{_fmt(self.host_total):>12}  (available now: {_fmt(self.host_available)} "
            f"+ {_fmt(self.host_in_use)} held by the parameters)"
        )
        device = "GPU per rank" if dp else "device"
        if "saved layer inputs" in self.device:
            rows.append(f"  {device}:")
        else:
            rows.append(f"  {device} (before activations; pass plan_batch_tokens to include them):")
        rows += [f"    {k:<32}{_fmt(v):>12}" for k, v in self.device.items()]
        free = "not checked (CPU)" if self.device_free is None else _fmt(self.device_free)
        rows.append(f"    {'total per rank' if dp else 'total':<32}{_fmt(self.device_total):>12}  (free now: {free})")
        if self.stream_bytes and dp:
            rows.append(
                f"  host link per rank and micro-batch: {_fmt(self.transfer_bytes())} (its 1/{n} of each layer's weights in twice, "
                f"its 1/{n} of the layer gradients out); hidden behind compute from ~{self.tokens_to_hide_transfers():,} tokens "
                "per micro-batch (at 50 GB/s and 800 TFLOPS)"
            )
            across = f"; between nodes: {_fmt(self.internode_bytes)} (all-reduce of its gradient shards)" if self.nodes > 1 else ""
            rows.append(
                f"  GPU to GPU per rank and micro-batch: {_fmt(self.gather_bytes)} (all-gather of the weights twice, "
                f"reduce-scatter of the layer gradients){across}"
            )
        elif self.stream_bytes:
            rows.append(
                f"  host link per micro-batch: {_fmt(self.transfer_bytes())} (weights in twice, layer gradients out); "
                f"hidden behind compute from ~{self.tokens_to_hide_transfers():,} tokens per micro-batch "
                "(at 50 GB/s and 800 TFLOPS)"
            )
        rows.append(
            f"  setup: writes {_fmt(self.setup_bytes)} into the host arenas, ~{self.setup_seconds():.0f} s (estimate at "
            f"{SETUP_BYTES_PER_S / 1e9:.1f} GB/s, benchmarks/setup.py; page-locking not included)"
        )
        rows.append(f"  fits: {'yes' if self.fits() else 'NO'}")
        return "\n".join(rows)


def _hidden_size(module: nn.Module, layers: Sequence[nn.Module]) -> int | None:
    for m in module.modules():
        size = getattr(getattr(m, "config", None), "hidden_size", None)
        if isinstance(size, int):
            return size
    for layer in layers[:1]:
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                return m.in_features
    return None


def plan_memory(
    module: nn.Module,
    layers: Sequence[nn.Module],
    compute_dtype: torch.dtype,
    device: torch.device,
    prefetch: int = 1,
    optimizers: Iterable[Optimizer] = (),
    grads: bool = True,
    batch_tokens: int | None = None,
    hidden_size: int | None = None,
    host_memory: str = "auto",
    host_memory_reason: str = "",
    host_available: int | None = None,
    device_free: int | None = None,
    grad_channels: int | None = None,
    ranks_per_node: int = 1,
    nodes: int = 1,
    shm_dir: str | None = None,
    shm_free: int | None = None,
) -> MemoryPlan:
    """The plan for streaming ``layers`` of ``module``; a public function so users can call it before a long load.

    The device part includes an estimate of one layer's working set: its weight gradients in the
    streamed dtype and autocast's casts of weights streamed in another dtype; with ``batch_tokens``
    (tokens per micro-batch) also ``~16 x tokens x hidden`` activations in it, and the saved layer inputs
    (``layers x tokens x hidden`` in the compute dtype). ``hidden_size`` is read
    from an HF config or the first layer's first ``nn.Linear`` when not given. ``host_memory`` is a
    mode as for :class:`~lightning_megatrain.MegaTrainStrategy`: ``"auto"`` (the default, as there) is
    resolved by :func:`choose_host_memory` for ``device``, ``compute_dtype`` and ``batch_tokens``.
    ``host_available`` and ``device_free`` replace what this machine has (to plan for another one).

    Data parallel (``ranks_per_node`` GPUs on each of ``nodes`` nodes): the node holds one copy of the
    fp32 masters, gradients and streamed image in shared memory (``shm_dir``: ``MEGATRAIN_SHM_DIR`` or
    ``/dev/shm``; ``shm_free`` replaces its free bytes), each rank its 1/N of the optimizer state and its
    own gradient staging; each GPU holds whole layers in its slots, plus a 1/N shard buffer per slot.
    ``host_available`` is then the node's, and the plan's host figures are per node.
    """
    if host_memory == "auto":  # the strategy's default, resolved the way the strategy resolves it
        host_memory, why = choose_host_memory(host_memory, device, compute_dtype, batch_tokens)
        host_memory_reason = host_memory_reason or why
    if host_memory not in ("fast", "compact", "lean"):
        raise ValueError(f"plan_memory needs host_memory 'auto', 'fast', 'compact' or 'lean', got {host_memory!r}")
    for name, value in (("ranks_per_node", ranks_per_node), ("nodes", nodes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"plan_memory needs {name} to be a positive int (GPUs per node, nodes), got {value!r}")
    dp = ranks_per_node * nodes > 1
    layer_numels, layer_trainable, layer_images, layer_casts = [], [], [], []
    layer_ids: set[int] = set()
    store = {"trainable": 0, "frozen": 0, "cast": 0}  # host bytes: fp32 masters, frozen as stored, compute copies

    def count(ps: list[torch.Tensor], cdtype: torch.dtype) -> int:
        """Add ``ps`` (one unit) to ``store``; return the bytes of the unit's streamed image."""
        trainable = [p.requires_grad and grads for p in ps]
        dtypes = stream_dtypes(ps, trainable, cdtype)
        for p, t, sd in zip(ps, trainable, dtypes):
            store["trainable" if t else "frozen"] += p.numel() * p.element_size()
            if sd != p.dtype:
                store["cast"] += p.numel() * _size(sd)
        # what autocast holds of the streamed weights cast to the compute dtype while the layer runs
        layer_casts.append(sum(p.numel() for p, sd in zip(ps, dtypes) if sd != compute_dtype) * _size(compute_dtype))
        return image_layout(dtypes, [p.numel() for p in ps])[1]

    # without a host compute copy ("compact", "lean") the layers stream their fp32 masters
    stream_dtype = compute_dtype if host_memory == "fast" else torch.float32
    for layer in layers:
        ps = list({id(p): p for p in layer.parameters()}.values())
        layer_ids.update(id(p) for p in ps)
        layer_numels.append(sum(p.numel() for p in ps))
        layer_trainable.append(sum(p.numel() for p in ps if p.requires_grad and grads))
        layer_images.append(count(ps, stream_dtype))
    all_params = list({id(p): p for p in module.parameters()}.values())
    outer = [p for p in all_params if id(p) not in layer_ids]
    outer_image = count(outer, torch.float32)
    outer_numel = sum(p.numel() for p in outer)
    outer_trainable = sum(p.numel() for p in outer if p.requires_grad and grads)
    params = sum(layer_numels) + outer_numel
    trainable = sum(layer_trainable) + outer_trainable
    csize = _size(compute_dtype)  # activations
    ssize = _size(stream_dtype)  # layer gradient buffers
    optimizers = list(optimizers)
    state = max((optimizer_state_bytes(o) for o in optimizers), default=0) if grads else 0
    n_slots = prefetch + 1
    n_channels = grad_channels if grad_channels is not None else 2
    host = {"fp32 master weights": store["trainable"]}
    if store["frozen"]:
        host["frozen weights (as stored)"] = store["frozen"]
    host["fp32 gradients"] = 4 * trainable
    if host_memory == "lean":
        host["optimizer state, bf16 (estimate)"] = state // 2 * trainable
        # chunks of one layer's size; a single parameter larger than a layer is widened whole
        largest = max([*layer_trainable, *(p.numel() for p in outer if p.requires_grad and grads)], default=0)
        host["fp32 scratch of one layer's state"] = state * largest
    else:
        host["optimizer state (estimate)"] = state * trainable
    host["gradient staging"] = 4 * outer_trainable + n_channels * ssize * max(layer_trainable, default=0)
    if store["cast"]:
        host[f"{str(compute_dtype).removeprefix('torch.')} compute copies"] = store["cast"]
    dev = {
        "weight slots": n_slots * max(layer_images, default=0),
        "gradient buffers": n_channels * ssize * max(layer_trainable, default=0),
        "non-layer params and grads": outer_image + 8 * outer_trainable,
    }
    stream_bytes = sum(layer_images)
    # One layer's backward makes its weights' gradients in the streamed dtype all at once, before they are
    # packed; weights streamed in another dtype than the compute dtype (fp32 masters in "compact" and
    # "lean", fp32 adapters) are also held cast to it by autocast while the layer is recomputed.
    working = ssize * max(layer_trainable, default=0) + max(layer_casts[: len(layers)], default=0)
    if batch_tokens:
        hidden = hidden_size or _hidden_size(module, layers)
        if hidden:
            dev["saved layer inputs"] = len(layers) * batch_tokens * hidden * csize
            working += 16 * batch_tokens * hidden * csize
    if working:
        dev["one layer's working set (est.)"] = working
    setup_bytes = store["trainable"] + store["frozen"] + store["cast"]
    pinned_bytes = sum(layer_images) + outer_image + host["gradient staging"]
    shared: dict[str, int] = {}
    private: dict[str, int] = {}
    gather_bytes = internode_bytes = 0
    if dp:
        from .engine.collective import ALIGN

        n = ranks_per_node

        def chunk(nbytes: int) -> int:  # as Collective.chunk: one rank's bytes of an image padded to n of them
            per = -(-nbytes // n)
            return -(-per // ALIGN) * ALIGN

        largest_image = max(layer_images, default=0)
        largest_grads = ssize * max(layer_trainable, default=0)
        per_rank_state = {
            "optimizer state (estimate)": (f"optimizer state, 1/{n} (est.)", state * -(-trainable // n)),
            "optimizer state, bf16 (estimate)": (f"optimizer state, bf16, 1/{n} (est.)", state // 2 * -(-trainable // n)),
            # a rank widens only its pieces of a layer: 1/N of one layer's state
            "fp32 scratch of one layer's state": (f"fp32 scratch of 1/{n} layer's state", -(-host.get("fp32 scratch of one layer's state", 0) // n)),
        }
        shared = {k: v for k, v in host.items() if k not in per_rank_state and k != "gradient staging"}
        private = {name: v for k, (name, v) in per_rank_state.items() if k in host}
        private[f"gradient staging (1/{n})"] = chunk(4 * outer_trainable) + n_channels * chunk(largest_grads)
        host = {**shared, **{f"{k} x {n} ranks": n * v for k, v in private.items()}}
        # a rank page-locks the 1/N of each image it copies to its GPU, and its own staging
        pinned_bytes = sum(chunk(b) for b in [*layer_images, outer_image]) + private[f"gradient staging (1/{n})"]
        dev = {
            "weight slots (whole layers)": n_slots * n * chunk(largest_image),
            f"weight shards (1/{n} per slot)": n_slots * chunk(largest_image),
            "gradient buffers (whole layers)": n_channels * n * chunk(largest_grads),
            **{k: v for k, v in dev.items() if k not in ("weight slots", "gradient buffers")},
        }
        # ring collectives: a rank receives (n-1) shards of each layer in each all-gather and sends (n-1) in
        # the reduce-scatter; across nodes each shard is all-reduced (2 (nodes-1)/nodes of it per rank)
        layer_grads = [chunk(ssize * t) for t in layer_trainable]
        gather_bytes = (n - 1) * (2 * sum(chunk(b) for b in layer_images) + sum(layer_grads))
        internode_bytes = 2 * (nodes - 1) * sum(layer_grads) // nodes
        stream_bytes = sum(chunk(b) for b in layer_images)
        grad_bytes = sum(layer_grads)
        shm_dir = shm_dir or os.environ.get("MEGATRAIN_SHM_DIR", "/dev/shm")
        if shm_free is None:
            try:
                shm_free = shutil.disk_usage(shm_dir).free
            except OSError:
                shm_free = 0  # missing: the refusal names the directory
    else:
        grad_bytes = ssize * sum(layer_trainable)
    device = torch.device(device)
    if device_free is None and device.type == "cuda":
        device_free = torch.cuda.mem_get_info(device)[0]
    return MemoryPlan(
        n_layers=len(layers),
        params=params,
        trainable=trainable,
        host=host,
        device=dev,
        # the parameters' own memory is freed as each unit is made (none on the meta device)
        host_in_use=sum(p.numel() * p.element_size() for p in all_params if not p.is_meta),
        layer_params=sum(layer_numels),
        layer_trainable=sum(layer_trainable),
        stream_bytes=stream_bytes,
        grad_bytes=grad_bytes,
        host_available=psutil.virtual_memory().available if host_available is None else host_available,
        device_free=device_free,
        host_memory=host_memory,
        host_memory_reason=host_memory_reason,
        ranks_per_node=ranks_per_node,
        nodes=nodes,
        host_shared=shared,
        host_private=private,
        shm_dir=shm_dir if dp and shm_dir else "",
        shm_free=shm_free if dp else None,
        gather_bytes=gather_bytes,
        internode_bytes=internode_bytes,
        setup_bytes=setup_bytes,
        pinned_bytes=pinned_bytes,
    )


def anonymous_rss() -> int:
    """This process's anonymous resident memory: what a copy in RAM costs. File-backed pages (the
    memory-mapped checkpoint shards) are page cache and not counted. Falls back to RSS off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


class HostMemoryPeak:
    """Context manager sampling :func:`anonymous_rss` on a thread; ``extra`` is the peak above the start.

    Used by the tests and benchmarks that check a save or load adds about one shard, not a model copy.
    """

    def __init__(self, interval_s: float = 0.0005) -> None:
        self.interval_s = interval_s
        self.base = self.peak = 0

    def __enter__(self) -> "HostMemoryPeak":
        import threading

        self.base = self.peak = anonymous_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-memory-peak", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anonymous_rss())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def peak_rss_growth(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn``; return its result and the peak resident memory above the level before it, in bytes
    (Linux: the kernel's exact high-water mark, reset first; elsewhere: sampled by :class:`HostMemoryPeak`)."""
    import re
    from pathlib import Path

    status = Path("/proc/self/status")

    def read(key: str) -> int:
        match = re.search(rf"^{key}:\s+(\d+) kB", status.read_text(), re.M)
        if match is None:
            raise OSError(f"no {key} in {status}")
        return int(match.group(1)) * 1024

    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = read("VmRSS")
    except OSError:
        with HostMemoryPeak() as peak:
            out = fn()
        return out, peak.extra
    out = fn()
    return out, read("VmHWM") - base
