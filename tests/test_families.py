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

SEQ = 12  # models.data() sequence length; sliding windows below are smaller than this


def _small(**extra: Any) -> dict[str, Any]:
    """The common tiny decoder sizes; ``extra`` overrides or adds family-specific fields."""
    cfg: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=None,
    )
    cfg.update(extra)
    return cfg


def qwen2(**kw: Any) -> Any:
    # layer 0 full attention, layer 1 sliding-window attention (max_window_layers=1); q/k/v have biases
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_small(
        num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1, attention_dropout=0.1, **kw,
    )))


def qwen3(**kw: Any) -> Any:
    # per-head q/k RMSNorm inside the attention, tied embeddings
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_small(
        head_dim=8, tie_word_embeddings=True, attention_dropout=0.1, **kw,
    )))


def mistral(**kw: Any) -> Any:
    # every layer uses a sliding window smaller than the sequence
    return transformers.MistralForCausalLM(transformers.MistralConfig(**_small(sliding_window=4, attention_dropout=0.1, **kw)))


def gemma2(**kw: Any) -> Any:
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**_small(
        num_hidden_layers=3, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=8, attention_dropout=0.1, **kw,
    )))


def gpt2(**kw: Any) -> Any:
    # Conv1D projections, learned positions, tied head, dropout on embeddings, attention and residuals
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=2 * SEQ, bos_token_id=0, eos_token_id=1, **kw,
    ))


def qwen2_moe(**kw: Any) -> Any:
    # 8 routed experts, top-2, plus the shared expert; every layer is sparse
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**_small(
        moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=1, norm_topk_prob=False, **kw,
    )))


def mixtral(**kw: Any) -> Any:
    # 8 experts, top-1
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**_small(
        intermediate_size=16, num_local_experts=8, num_experts_per_tok=1, **kw,
    )))


class FamilyLM(Recorder):
    """A causal LM of any HF family from a builder above (no hub download)."""

    def __init__(self, build: Callable[..., Any], **kw: Any) -> None:
        super().__init__()
        self.model = build(**kw)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx).logits

    def loss(self, batch: Any) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss


def _layers(model: Any) -> Any:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _streamed_layers(make: Callable[[], FamilyLM]) -> list[str]:
    """Class names of the modules megatrain streams for this model."""
    from lightning_megatrain.engine.layers import find_layers

    return [type(m).__name__ for m in find_layers(make())]


@pytest.mark.parametrize(
    "build, layer_cls",
    [
        (qwen2, "Qwen2DecoderLayer"),
        (qwen3, "Qwen3DecoderLayer"),
        (mistral, "MistralDecoderLayer"),
        (gpt2, "GPT2Block"),
    ],
    ids=["qwen2", "qwen3", "mistral", "gpt2"],
)
def test_hf_family(build: Callable[..., Any], layer_cls: str) -> None:
    make = lambda: FamilyLM(build)  # noqa: E731
    n = len(_layers(make().model))
    assert _streamed_layers(make) == [layer_cls] * n  # the decoder layers are what gets streamed
    plain, mega = fit_pair(make, max_steps=4)
    assert_same_training(plain, mega)


def test_qwen2_layers_differ() -> None:
    layers = _layers(qwen2())
    assert [l.self_attn.sliding_window for l in layers] == [None, 4, 4]


def test_gpt2_uses_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    block = _layers(gpt2())[0]
    assert isinstance(block.attn.c_attn, Conv1D) and isinstance(block.mlp.c_fc, Conv1D)


def test_qwen3_and_gpt2_ties_survive() -> None:
    for build, head, emb in ((qwen3, "lm_head", "model.embed_tokens"), (gpt2, "lm_head", "transformer.wte")):
        plain, mega = None, None
        m = FamilyLM(build).model
        assert m.get_submodule(head).weight is m.get_submodule(emb).weight


def test_gemma2_per_layer_sliding_window_and_softcapping() -> None:
    make = lambda: FamilyLM(gemma2)  # noqa: E731
    model = make().model
    cfg = model.config
    # the layers really are configured differently: alternating sliding-window / global attention
    windows = [l.self_attn.sliding_window for l in model.model.layers]
    assert windows == [4, None, 4] and 4 < SEQ
    assert all(l.self_attn.attn_logit_softcapping == 5.0 for l in model.model.layers)
    assert cfg.final_logit_softcapping == 3.0 and cfg._attn_implementation == "eager"
    # ... and that matters for the output: the same weights with every layer global give other logits
    L.seed_everything(0)
    mixed = gemma2().eval()
    L.seed_everything(0)
    glob = gemma2(layer_types=["full_attention"] * 3).eval()
    idx = next(iter(data()))[0]
    with torch.no_grad():
        assert not torch.allclose(mixed(input_ids=idx).logits, glob(input_ids=idx).logits, atol=1e-4)

    plain, mega = fit_pair(make, max_steps=4)
    assert_same_training(plain, mega)
