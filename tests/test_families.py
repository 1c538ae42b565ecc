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

from models import VOCAB, Recorder, assert_same_training, data, fit_pair

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
    # eager attention (Gemma2 has no sdpa path because of the softcapping)
    return transformers.Gemma2ForCausalLM(_config(transformers.Gemma2Config, dict(
        num_hidden_layers=3, head_dim=8, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=8, attention_dropout=0.1,
    ), kw))


def gpt2(**kw: Any) -> Any:
    # Conv1D projections, learned positions, tied head, dropout on embeddings, attention and residuals
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=2 * SEQ, bos_token_id=0, eos_token_id=1)
    cfg.update(kw)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))


def qwen2_moe(**kw: Any) -> Any:
    # 16 routed experts, top-2, plus the gated shared expert, in every layer
    return transformers.Qwen2MoeForCausalLM(_config(transformers.Qwen2MoeConfig, dict(
        moe_intermediate_size=8, shared_expert_intermediate_size=32, num_experts=16, num_experts_per_tok=2,
        decoder_sparse_step=1, norm_topk_prob=False,
    ), kw))


def mixtral(**kw: Any) -> Any:
    # 16 experts, top-1, with router jitter noise (random in training: the recompute must route the same way)
    return transformers.MixtralForCausalLM(_config(transformers.MixtralConfig, dict(
        intermediate_size=8, num_local_experts=16, num_experts_per_tok=1, router_jitter_noise=0.1,
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
# SGD (momentum) to keep the default tolerances. Their gradients agree to ~1e-10 either way.
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


def test_qwen3_head_stays_tied() -> None:
    plain, mega = fit_pair(lambda: FamilyLM(qwen3), max_steps=1)
    assert mega.model.lm_head.weight is mega.model.model.embed_tokens.weight


def _logits_differ(a: Any, b: Any) -> bool:
    idx = next(iter(data()))[0]
    with torch.no_grad():
        return not torch.allclose(a.eval()(input_ids=idx).logits, b.eval()(input_ids=idx).logits, atol=1e-4)


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
    assert [l.self_attn.sliding_window for l in model.model.layers] == [WINDOW, None, WINDOW]
    assert [l.self_attn.attn_logit_softcapping for l in model.model.layers] == [5.0] * 3
    assert model.config.final_logit_softcapping == 3.0 and model.config._attn_implementation == "eager"
    assert _logits_differ(*_pair(gemma2, layer_types=["full_attention"] * 3))
    assert _logits_differ(*_pair(gemma2, attn_logit_softcapping=None))
    assert _logits_differ(*_pair(gemma2, final_logit_softcapping=None))
    # Qwen2: global first layer, sliding-window layers after it
    assert [l.self_attn.sliding_window for l in qwen2().model.layers] == [None, WINDOW, WINDOW]
    assert _logits_differ(*_pair(qwen2, use_sliding_window=False))
    # Mistral: every layer sliding
    assert [l.self_attn.config.sliding_window for l in mistral().model.layers] == [WINDOW] * 2
    assert _logits_differ(*_pair(mistral, sliding_window=None))
