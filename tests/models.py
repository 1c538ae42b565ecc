"""Models used by the tests: hand-written blocks, HF transformers from small configs, no layer stack."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_megatrain.engine.stepper import enable_fused

VOCAB = 64


class Block(nn.Module):
    """A pre-norm MLP block with dropout and an attention-like mixing step."""

    def __init__(self, d: int, p: float = 0.1) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor, scale: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln(x)
        h = h + torch.cumsum(self.mix(h), dim=1) / (1 + torch.arange(h.shape[1], device=h.device)[:, None])
        if mask is not None:
            h = h * mask[..., None]
        return x + scale * self.drop(self.out(torch.relu(self.fc(h))))


class Recorder(L.LightningModule):
    """Records per-step losses and the gradient norm seen in on_before_optimizer_step."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.opt_name = "adamw"
        self.lr = 1e-2
        self.sched = True

    def loss(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.loss(batch)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.logits(batch[0])

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        grads = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        self.norms.append(torch.stack(grads).norm().item() if grads else 0.0)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.opt_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=0.01)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.1)
        if not self.sched:
            return opt
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.5), "interval": "step"}]


class BlockLM(Recorder):
    def __init__(self, d: int = 16, n: int = 4, tied: bool = False, dropout: float = 0.1) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList([Block(d, dropout) for _ in range(n)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.gain = nn.Parameter(torch.ones(()))  # a raw parameter outside any submodule
        if tied:
            self.head.weight = self.emb.weight

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) * self.gain
        mask = torch.ones(idx.shape, device=idx.device)
        for block in self.blocks:
            x = block(x, scale=0.5, mask=mask)
        return self.head(self.norm(x))

    def loss(self, batch: Any) -> torch.Tensor:
        idx = batch[0]
        logits = self.logits(idx)
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())


class MLP(Recorder):
    """No repeated layer stack at all."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, VOCAB))

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(self.emb(idx))

    def loss(self, batch: Any) -> torch.Tensor:
        idx = batch[0]
        return nn.functional.cross_entropy(self.logits(idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten())


class HFLM(Recorder):
    """An HF transformers causal LM built from a small config (no hub download)."""

    def __init__(self, family: str = "llama", tied: bool = False, layers: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        import transformers

        if family == "llama":
            cfg = transformers.LlamaConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, attention_dropout=dropout,
            )
            self.model = transformers.LlamaForCausalLM(cfg)
        else:
            raise ValueError(family)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx).logits

    def loss(self, batch: Any) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss


def data(n: int = 24, t: int = 12, batch_size: int = 4, seed: int = 1234) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randint(0, VOCAB, (n, t), generator=g)), batch_size=batch_size)


class SameKernel(L.Callback):
    """Plain Lightning steps with the optimizer implementation megatrain picks: exactness tests compare
    like with like.

    Under ``fused_optimizer=True`` (the default) megatrain switches Adam/AdamW/SGD whose user left the
    implementation to torch to the fused CPU kernel (``enable_fused``); plain Lightning on the CPU runs
    torch's for-loop kernel. The two round differently by a few ulp, differently on each CPU (vector
    width, FMA), and bf16-mixed amplifies that to 1e-4 of a loss on some CPUs. This applies the same
    ``enable_fused`` to the plain run's optimizers (after a checkpoint restored them); ``fused=False``
    leaves torch's choice, as megatrain with ``fused_optimizer=False`` does. The fused kernel itself is
    bounded against the for-loop in test_exactness.py::test_fused_cpu_adamw_is_within_rounding_of_the_for_loop.
    """

    def __init__(self, fused: bool = True) -> None:
        self.fused = fused

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fused:
            for optimizer in trainer.optimizers:
                enable_fused(optimizer)


def is_megatrain(strategy: Any) -> bool:
    from lightning_megatrain import MegaTrainStrategy

    return strategy == "megatrain" or isinstance(strategy, MegaTrainStrategy)


def megatrain_fuses(strategy: Any) -> bool:
    """Whether megatrain run with ``strategy`` picks the fused CPU kernel (its ``fused_optimizer``)."""
    config = getattr(strategy, "config", None)
    return bool(getattr(config, "fused_optimizer", True))


def trainer(strategy: Any = "auto", fused: bool = True, **kwargs: Any) -> L.Trainer:
    """A small CPU Trainer. A plain (not megatrain) one steps with the kernel megatrain picks by default
    (:class:`SameKernel`; ``fused=False``: torch's own choice, as megatrain with ``fused_optimizer=False``)."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    if not is_megatrain(strategy):
        defaults["callbacks"] = [*(defaults.get("callbacks") or []), SameKernel(fused)]
    return L.Trainer(strategy=strategy, **defaults)


def fit_pair(make: Callable[[], Recorder], strategy: Any = "megatrain", loader: Callable[[], DataLoader] = data, **kwargs: Any) -> tuple[Recorder, Recorder]:
    """The same model, data and seed trained by plain Lightning and by megatrain, in this process, both
    stepping with the same optimizer implementation (:class:`SameKernel`)."""
    out = []
    for strat in ("auto", strategy):
        L.seed_everything(0)
        model = make()
        trainer(strat, fused=megatrain_fuses(strategy), **kwargs).fit(model, loader())
        out.append(model)
    return out[0], out[1]


def assert_same_training(plain: Recorder, mega: Recorder, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert len(plain.losses) > 0 and len(plain.losses) == len(mega.losses)
    torch.testing.assert_close(torch.tensor(mega.losses), torch.tensor(plain.losses), rtol=rtol, atol=atol)
    assert len(plain.norms) == len(mega.norms)
    torch.testing.assert_close(torch.tensor(mega.norms), torch.tensor(plain.norms), rtol=rtol, atol=atol)
    pp, mp = dict(plain.named_parameters()), dict(mega.named_parameters())
    assert pp.keys() == mp.keys()
    for name in pp:
        torch.testing.assert_close(mp[name], pp[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
