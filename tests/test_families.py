"""megatrain against plain Lightning for Hugging Face model families built from tiny configs (CPU).

Each test trains the same randomly initialised model on the same data with the same seed, once with
plain Lightning and once with ``strategy="megatrain"``, in this process, and compares per-step
losses, the gradient norms seen in ``on_before_optimizer_step`` and the final parameters
(``assert_same_training``). Llama is covered in test_exactness.py.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import pytest
import torch

from models import VOCAB, Recorder, assert_same_training, data, fit_pair, trainer

transformers = pytest.importorskip("transformers")

SEQ = 12  # models.data() sequence length; the sliding windows below are smaller than this
WINDOW = 4


def _config(cls: Any, base: dict[str, Any], kw: dict[str, Any]) -> Any:
    cfg: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
    )
    cfg.update(base)
    cfg.update(kw)
    return cls(**cfg)


def qwen2(**kw: Any) -> Any:
    # q/k/v biases; layer 0 global, layers 1-2 sliding-window attention (max_window_layers=1)
    return transformers.Qwen2ForCausalLM(_config(transformers.Qwen2Config, dict(
        num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, attention_dropout=0.1,
    ), kw))


def qwen3(**kw: Any) -> Any:
    # per-head q/k RMSNorm in the attention, tied embeddings
    return transformers.Qwen3ForCausalLM(_config(transformers.Qwen3Config, dict(
        head_dim=8, tie_word_embeddings=True, attention_dropout=0.1,
    ), kw))


def mistral(**kw: Any) -> Any:
    # every layer attends through a sliding window smaller than the sequence
    return transformers.MistralForCausalLM(_config(transformers.MistralConfig, dict(
        sliding_window=WINDOW, attention_dropout=0.1,
    ), kw))


def gemma2(**kw: Any) -> Any:
    # eager attention (Gemma2 has no sdpa path because of the softcapping); a larger init than the
    # default 0.02 so that attention scores and logits are large enough for the softcaps to bend them
    return transformers.Gemma2ForCausalLM(_config(transformers.Gemma2Config, dict(
        num_hidden_layers=3, head_dim=8, sliding_window=WINDOW, initializer_range=0.2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=8, attention_dropout=0.1,
    ), kw))


def gpt2(**kw: Any) -> Any:
    # Conv1D projections, learned positions, tied head, dropout on embeddings, attention and residuals
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=2 * SEQ, bos_token_id=0, eos_token_id=1)
    cfg.update(kw)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))


def qwen2_moe(**kw: Any) -> Any:
    # 16 routed experts, top-1, plus the gated shared expert, in every layer; the eager experts
    # implementation loops in Python over the experts that got tokens (data-dependent control flow)
    return transformers.Qwen2MoeForCausalLM(_config(transformers.Qwen2MoeConfig, dict(
        moe_intermediate_size=8, shared_expert_intermediate_size=32, num_experts=16, num_experts_per_tok=1,
        decoder_sparse_step=1, norm_topk_prob=False, experts_implementation="eager",
    ), kw))


def mixtral(**kw: Any) -> Any:
    # 16 experts, top-2 (top-1 would make the renormalised routing weight 1 and the router's true gradient
    # zero), router jitter noise (random in training: the recompute must route the same way), and the
    # default experts implementation, grouped_mm over all experts at once
    return transformers.MixtralForCausalLM(_config(transformers.MixtralConfig, dict(
        intermediate_size=8, num_local_experts=16, num_experts_per_tok=2, router_jitter_noise=0.1,
    ), kw))


class FamilyLM(Recorder):
    """A causal LM of any HF family from a builder above (no hub download)."""

    def __init__(self, build: Callable[..., Any], opt: str = "adamw", **kw: Any) -> None:
        super().__init__()
        self.model = build(**kw)
        self.opt_name = opt

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx).logits

    def loss(self, batch: Any) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss


def _layers(model: Any) -> Any:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _check_streamed(make: Callable[[], FamilyLM], layer_cls: str) -> None:
    """The decoder layers are what megatrain finds and streams."""
    from lightning_megatrain.engine.layers import find_layers

    model = make()
    assert [type(m).__name__ for m in find_layers(model)] == [layer_cls] * len(_layers(model.model))


# AdamW divides each gradient by its own running RMS, so an element whose true gradient is zero or
# nearly so gets an lr-sized step from float noise alone, with a sign that depends on rounding. The
# key bias of GPT-2 gets an exactly-zero gradient in exact arithmetic (softmax is shift invariant)
# and Qwen2's key bias nearly so in its slowest-rotating RoPE dims; plain Lightning and megatrain
# compute those noise gradients in a different order, so the families with key biases train with
# SGD (momentum) to keep the default tolerances. With AdamW their per-step gradients still agree with
# plain Lightning to < 1e-7 (the key-bias gradients are ~1e-11 for GPT-2), but the final key biases
# differ by up to ~1e-5.
FAMILIES = [
    pytest.param(qwen2, "sgd", "Qwen2DecoderLayer", id="qwen2"),
    pytest.param(qwen3, "adamw", "Qwen3DecoderLayer", id="qwen3"),
    pytest.param(mistral, "adamw", "MistralDecoderLayer", id="mistral"),
    pytest.param(gemma2, "adamw", "Gemma2DecoderLayer", id="gemma2"),
]


@pytest.mark.parametrize("build, opt, layer_cls", FAMILIES)
def test_hf_family(build: Callable[..., Any], opt: str, layer_cls: str) -> None:
    make = lambda: FamilyLM(build, opt)  # noqa: E731
    _check_streamed(make, layer_cls)
    plain, mega = fit_pair(make, max_steps=4)
    assert_same_training(plain, mega)
    tied = mega.model.get_output_embeddings().weight is mega.model.get_input_embeddings().weight
    assert tied == mega.model.config.tie_word_embeddings  # Qwen3 and Gemma2 tie the head to the embeddings


def _logit_change(a: Any, b: Any) -> float:
    idx = next(iter(data()))[0]
    with torch.no_grad():
        return (a.eval()(input_ids=idx).logits - b.eval()(input_ids=idx).logits).abs().max().item()


def _pair(build: Callable[..., Any], **other: Any) -> tuple[Any, Any]:
    L.seed_everything(0)
    a = build()
    L.seed_everything(0)
    return a, build(**other)


def test_per_layer_attention_is_really_configured() -> None:
    """Guards the premise of the family tests: layers differ, and the differences change the output."""
    assert WINDOW < SEQ
    # Gemma2: alternating sliding-window / global attention, attention logit and final logit softcapping
    model = gemma2()
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [WINDOW, None, WINDOW]
    assert [layer.self_attn.attn_logit_softcapping for layer in model.model.layers] == [5.0] * 3
    assert model.config.final_logit_softcapping == 3.0 and model.config._attn_implementation == "eager"
    assert _logit_change(*_pair(gemma2, layer_types=["full_attention"] * 3)) > 1e-2
    assert _logit_change(*_pair(gemma2, attn_logit_softcapping=None)) > 1e-2
    assert _logit_change(*_pair(gemma2, final_logit_softcapping=None)) > 1e-2
    # Qwen2: global first layer, sliding-window layers after it
    assert [layer.self_attn.sliding_window for layer in qwen2().model.layers] == [None, WINDOW, WINDOW]
    assert _logit_change(*_pair(qwen2, use_sliding_window=False)) > 1e-2
    # Mistral: every layer sliding
    assert [layer.self_attn.config.sliding_window for layer in mistral().model.layers] == [WINDOW] * 2
    assert _logit_change(*_pair(mistral, sliding_window=None)) > 1e-2


# ----------------------------------------------------------------------------- GPT-2


def test_gpt2_uses_conv1d_and_a_tied_head() -> None:
    from transformers.pytorch_utils import Conv1D

    model = gpt2()
    block = model.transformer.h[0]
    assert all(isinstance(m, Conv1D) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_without_cache() -> None:
    # SGD: see FAMILIES (GPT-2's key bias has an exactly-zero true gradient)
    make = lambda: FamilyLM(gpt2, "sgd", use_cache=False)  # noqa: E731
    _check_streamed(make, "GPT2Block")
    plain, mega = fit_pair(make, max_steps=4)
    assert_same_training(plain, mega)


def test_gpt2_default_config_uses_cache_in_training() -> None:
    # GPT2Model creates a DynamicCache in training and passes it to each block by position: the recompute
    # must not append to it a second time (megatrain drops caches passed by keyword or by position)
    plain, mega = fit_pair(lambda: FamilyLM(gpt2, "sgd"), max_steps=2)
    assert_same_training(plain, mega)


def _checkpointing_on(model: Any) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def test_gpt2_hf_gradient_checkpointing_is_turned_off_with_a_warning() -> None:
    # with HF checkpointing on, GPT2Model passes no cache to the blocks, so the default config is fine here;
    # dropout is on: plain Lightning replays it through torch.utils.checkpoint, megatrain through its own recompute
    def make() -> FamilyLM:
        m = FamilyLM(gpt2, "sgd")
        _checkpointing_on(m.model)
        assert all(b.gradient_checkpointing for b in m.model.transformer.h)
        return m

    with pytest.warns(UserWarning, match="gradient checkpointing on"):
        plain, mega = fit_pair(make, max_steps=3)
    assert_same_training(plain, mega)
    assert not any(b.gradient_checkpointing for b in mega.model.transformer.h)


# ----------------------------------------------------------------------------- mixture of experts


class MoELM(FamilyLM):
    """Records, at each optimizer step, every parameter's gradient (or None) and which experts each
    router sent tokens to in that step (under megatrain the routers run in the forward and again in
    the backward recompute; both land in the same step's record)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.grads: list[dict[str, torch.Tensor | None]] = []
        self.routed: list[dict[str, set[int]]] = []
        self._routed: dict[str, set[int]] = {}
        for name, m in self.named_modules():
            if type(m).__name__.endswith("TopKRouter"):
                m.register_forward_hook(self._record_routing(name.removesuffix(".gate")))

    def _record_routing(self, block: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, out: Any) -> None:
            self._routed.setdefault(block, set()).update(out[2].unique().tolist())  # (logits, weights, indices)

        return hook

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        super().on_before_optimizer_step(optimizer)
        self.grads.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in self.named_parameters()})
        self.routed.append(self._routed)
        self._routed = {}


def _zero_grad_experts(grads: dict[str, torch.Tensor | None]) -> dict[str, set[int]]:
    """For each fused expert tensor (experts x ...), the experts whose gradient slice is exactly zero."""
    out = {}
    for name, g in grads.items():
        if ".experts." in name:
            assert g is not None, name
            out[name] = {e for e in range(g.shape[0]) if not g[e].any()}
    return out


@pytest.mark.parametrize(
    "build, opt, layer_cls, experts",
    [
        # SGD: Qwen2 attention has key biases, see FAMILIES
        pytest.param(qwen2_moe, "sgd", "Qwen2MoeDecoderLayer", "eager", id="qwen2_moe-top1-eager"),
        pytest.param(mixtral, "adamw", "MixtralDecoderLayer", "grouped_mm", id="mixtral-top2-grouped_mm"),
    ],
)
def test_moe_experts_without_tokens(build: Callable[..., Any], opt: str, layer_cls: str, experts: str) -> None:
    make = lambda: MoELM(build, opt)  # noqa: E731
    assert make().model.config._experts_implementation == experts
    _check_streamed(make, layer_cls)
    plain, mega = fit_pair(make, max_steps=4)
    assert_same_training(plain, mega)
    n_experts = plain.model.config.num_experts if build is qwen2_moe else plain.model.config.num_local_experts
    assert len(plain.grads) == len(mega.grads) == len(plain.routed) == len(mega.routed) == 4
    n_idle = 0
    for step, (pg, mg) in enumerate(zip(plain.grads, mega.grads)):
        # the same experts got tokens (megatrain's recompute routed as its forward did, jitter noise included)
        routed = plain.routed[step]
        assert mega.routed[step] == routed and len(routed) == len(_layers(plain.model)), step
        idle = {block: set(range(n_experts)) - used for block, used in routed.items()}
        n_idle += sum(map(len, idle.values()))
        # experts without tokens have exactly zero gradient in both runs, and so do the same other experts
        # (e.g. one whose only tokens sit at the last position, which the shifted loss ignores)
        zero = _zero_grad_experts(pg)
        assert all(idle[n.split(".experts.")[0]] <= zeroed for n, zeroed in zero.items()), step
        assert _zero_grad_experts(mg) == zero, step
        # the same parameters have no gradient at all; every other gradient matches
        assert pg.keys() == mg.keys()
        assert [n for n, g in mg.items() if g is None] == [n for n, g in pg.items() if g is None], step
        for name, g in pg.items():
            if g is not None:
                torch.testing.assert_close(mg[name], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=name, s=step: f"step {s} {n}: {m}")
    assert n_idle > 0  # some experts got no token in some step (else this test checks nothing about them)


def test_moe_router_aux_loss_is_refused_clearly() -> None:
    # The load-balancing loss is computed from router logits that transformers' output recorder captures by hooks
    # inside the streamed layer's forward, which megatrain runs without a graph: the routers would silently get
    # 25-60x too small gradients. megatrain refuses it before allocating anything.
    model = MoELM(mixtral, output_router_logits=True, router_aux_loss_coef=0.1)
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ValueError, match="output_router_logits=True"):
        trainer("megatrain", max_steps=1).fit(model, data())
    assert [p.data_ptr() for p in model.parameters()] == ptrs
