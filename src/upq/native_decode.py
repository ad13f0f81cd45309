"""The native Llama forward for generation: the whole decoder in one C++ call per forward.

transformers' Llama forward spends most of a batch-1 decode step in per-layer Python, dispatch
and small tensor ops (``bench/results/decode.md``: 19.5 ms/token with every matmul free). The
native decoder (``kernels/csrc/llama_decoder.cpp``) runs embedding, norms, rotary, attention on
its own KV cache, SiLU and residuals in C++, and the decoder linears through the same packed
kernel (or ``at::linear`` for float weights) the transformers path calls, with sibling
projections stacked (q/k/v, gate/up). Numerics are float32 throughout; against the transformers
path only summation order differs (tested: same greedy tokens, logits within tolerance).

Cache layout: ``slots`` independent sequences, position = column; any set of new tokens, each
with its slot and position, goes through one :meth:`NativeDecoder.forward`. A prompt, a decode
step over the live slots of a continuous batch and a chat turn are all the same call.

Supported: Llama-architecture models (``LlamaForCausalLM`` and models of the same block layout)
on CPU in eval mode, with ``nn.Linear`` or natively runnable ``PackedLinear`` layers, SiLU MLPs
and a static rotary embedding (default, linear or llama3 scaling). Everything else gets a reason
from :func:`native_decode_reason` and callers fall back to the transformers forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .fusion import same_packed_format, stack_packed
from .kernels import GEMV_MAX_BATCH, load_native, native_error, native_unsupported_reason
from .modules import PackedLinear

__all__ = ["NativeDecoder", "native_decode_reason", "native_decoder"]

_SUPPORTED_TYPES = ("llama",)
_STATIC_ROPE = ("default", "linear", "llama3")
_PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
                ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))
_CACHE_ATTR = "_upq_native_decoder"


def _linear_reason(name: str, layer: nn.Module) -> str | None:
    if type(layer) is nn.Linear:
        return None
    if isinstance(layer, PackedLinear):
        reason = native_unsupported_reason(layer.spec, layer.in_features)
        return None if reason is None else f"{name}: {reason}"
    return f"{name} is a {type(layer).__name__}, not a linear or packed layer"


def native_decode_reason(model: nn.Module) -> str | None:
    """Why the native decoder cannot run ``model`` (``None``: it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in _SUPPORTED_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not a Llama architecture"
    if model.training:
        return "the model is in training mode"
    if load_native() is None:
        return f"native kernel unavailable ({native_error()})"
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "embed_tokens"):
        return "the model has no model.layers / model.embed_tokens"
    if any(p.device.type != "cpu" for p in model.parameters()):
        return "the model is not on the CPU"
    wide = next((p.dtype for p in model.parameters() if p.dtype == torch.float64), None)
    if wide is not None:
        return "the model is float64; the native decoder computes in float32"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the native decoder runs SiLU MLPs)"
    rope = getattr(body, "rotary_emb", None)
    if rope is None or getattr(rope, "rope_type", "default") not in _STATIC_ROPE:
        return f"rotary embedding {getattr(rope, 'rope_type', None)!r} is not a static one"
    head_dim = getattr(body.layers[0].self_attn, "head_dim", None) if len(body.layers) else None
    if head_dim is None or rope.inv_freq.numel() * 2 != head_dim:
        return "the rotary embedding does not cover the whole head (partial rotary)"
    for index, block in enumerate(body.layers):
        for part, names in _PROJECTIONS:
            for name in names:
                layer = getattr(getattr(block, part, None), name, None)
                reason = _linear_reason(f"layers.{index}.{part}.{name}", layer)
                if reason is not None:
                    return reason
    head = model.get_output_embeddings()
    return _linear_reason("lm_head", head)


def _dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """A float weight as the native decoder reads it: bfloat16 when every value is a bfloat16
    (a upq checkpoint stores its float tensors so; widening back is exact, and decode reads half
    the bytes), else float32 (shared with the model, not copied, when it is float32 already)."""
    weight = weight.detach()
    if weight.dtype == torch.bfloat16:
        return weight.contiguous()
    weight = weight.float().contiguous()
    narrow = weight.to(torch.bfloat16)
    return narrow if torch.equal(narrow.float(), weight) else weight


def _native_linear(layer: nn.Module) -> Any:
    """The C++ ``DecoderLinear`` of one ``nn.Linear`` or ``PackedLinear``."""
    mod = load_native()
    if type(layer) is nn.Linear:
        bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
        return mod.DecoderLinear(_dense_weight(layer.weight), None, None, bias, -1, 0, 0, GEMV_MAX_BATCH)
    bias = None if layer.bias is None else layer.bias.float().contiguous()
    return mod.DecoderLinear(layer.qweight, layer.scale, layer.zero, bias, layer.spec.impl.kernel_id,
                             layer.spec.bits, layer.spec.group_len(layer.in_features), GEMV_MAX_BATCH)


def _native_projection(layers: list[nn.Module]) -> list[Any]:
    """Sibling layers as ``DecoderLinear`` parts: packed siblings of one format become one stacked
    kernel call (a copy of their small buffers), anything else runs part by part."""
    if len(layers) > 1 and same_packed_format(layers):
        return [_native_linear(stack_packed(layers))]
    return [_native_linear(m) for m in layers]


class NativeDecoder:
    """A model's native forward and its KV cache (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        reason = native_decode_reason(model)
        if reason is not None:
            raise ValueError(f"the native decoder cannot run this model: {reason}")
        mod = load_native()
        config, body = model.config, model.model
        layers = []
        for block in body.layers:
            linears = [_native_projection([getattr(getattr(block, part), n) for n in names])
                       for part, names in _PROJECTIONS]
            layers.append(mod.DecoderLayer(block.input_layernorm.weight.detach().float().contiguous(),
                                           block.post_attention_layernorm.weight.detach().float().contiguous(),
                                           *linears))
        attention = body.layers[0].self_attn
        embed = body.embed_tokens.weight.detach()
        shape = mod.DecoderShape(
            hidden=config.hidden_size, heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=attention.head_dim, intermediate=config.intermediate_size,
            eps=float(body.norm.variance_epsilon), rope_scaling=float(body.rotary_emb.attention_scaling))
        self._native = mod.LlamaDecoder(embed.float().contiguous(), layers,
                                        body.norm.weight.detach().float().contiguous(),
                                        _native_linear(model.get_output_embeddings()),
                                        body.rotary_emb.inv_freq.detach().float(), shape)

    @property
    def slots(self) -> int:
        """Sequences the cache holds (0 before :meth:`reset`)."""
        return self._native.slots

    @property
    def capacity(self) -> int:
        """Positions each slot holds."""
        return self._native.capacity

    def reset(self, slots: int, capacity: int) -> None:
        """Empty the cache and size it to ``slots`` sequences of ``capacity`` positions."""
        self._native.reset(slots, capacity)

    def reserve(self, capacity: int) -> None:
        """Grow every slot to ``capacity`` positions, keeping the cached ones."""
        self._native.reserve(capacity)

    def set_profile(self, on: bool) -> None:
        """Start or stop timing each part of :meth:`forward` (see :meth:`take_profile`)."""
        self._native.set_profile(on)

    def take_profile(self) -> dict[str, float]:
        """Seconds spent per part of the forward since the last call (embedding, norms, linears,
        attention, mlp_activation, residual, lm_head), while profiling was on."""
        return dict(self._native.take_profile())

    @torch.no_grad()
    def forward(self, tokens: list[int] | torch.Tensor, slots: list[int] | torch.Tensor,
                positions: list[int] | torch.Tensor, logit_rows: list[int] | torch.Tensor) -> torch.Tensor:
        """Run new ``tokens`` (each at its ``slots`` entry and ``positions`` entry); return float32
        logits ``(len(logit_rows), vocab)`` of the tokens at indices ``logit_rows``.

        Every earlier position of each token's slot must be cached already (tokens of one slot go
        in position order). Positions beyond :attr:`capacity` raise ``RuntimeError``.
        """
        as_long = lambda v: v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.long)  # noqa: E731
        return self._native.forward(as_long(tokens), as_long(slots), as_long(positions), as_long(logit_rows))

    def prefill(self, slot: int, ids: list[int], start: int = 0) -> torch.Tensor:
        """Append ``ids`` to ``slot`` from position ``start``; logits ``(vocab,)`` after the last one."""
        n = len(ids)
        return self.forward(ids, [slot] * n, list(range(start, start + n)), [n - 1])[0]


def native_decoder(model: nn.Module) -> NativeDecoder | None:
    """The model's :class:`NativeDecoder` (built once and kept on the model), or ``None`` when
    :func:`native_decode_reason` says it cannot run the model.

    The decoder holds stacked copies of packed siblings (and a bfloat16 copy of a bfloat16-valued
    float head), so a model whose weights change afterwards needs a fresh ``NativeDecoder(model)``.
    """
    cached = model.__dict__.get(_CACHE_ATTR)
    if cached is not None:
        return cached
    if native_decode_reason(model) is not None:
        return None
    decoder = NativeDecoder(model)
    model.__dict__[_CACHE_ATTR] = decoder
    return decoder
