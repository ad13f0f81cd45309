"""QuantLinear / PackedLinear agreement and model-wide layer selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from upq.grids import GridSpec
from upq.modules import PackedLinear, QuantLinear, dequantize_model, pack_model, quantize_model, select_linears

SPECS = [
    GridSpec("seq", 2), GridSpec("seq", 4, 32), GridSpec("seq", 3, 64),
    GridSpec("asym", 2, 128), GridSpec("asym", 4), GridSpec("r2q", 2, 64), GridSpec("r2q", 2),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matches_fake_quant(spec: GridSpec, bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 40, bias=bias)
    quant = QuantLinear.from_linear(linear, spec)
    x = torch.randn(3, 7, 256)
    exact = quant.to_packed(scale_dtype=torch.float32)
    torch.testing.assert_close(exact(x), quant(x), rtol=1e-5, atol=1e-5)
    half = quant.to_packed()  # fp16 scales: equal up to fp16 rounding of the scales
    torch.testing.assert_close(half(x), quant(x), rtol=2e-3, atol=2e-3)
    assert half.qweight.dtype == torch.uint8 and half.qweight.shape == (40, 256 * spec.bits // 8 if spec.bits != 3 else 128)


def test_quant_linear_trains() -> None:
    torch.manual_seed(0)
    quant = QuantLinear.from_linear(nn.Linear(64, 8), GridSpec("seq", 2))
    quant(torch.randn(4, 64)).pow(2).sum().backward()
    assert quant.weight.grad is not None and quant.quantizer.delta.grad is not None
    assert quant.weight.grad.abs().sum() > 0 and quant.quantizer.delta.grad.abs().sum() > 0


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("input_grad", [False, True])
def test_seq_fused_linear_equals_fake_quant_then_linear(group_size: int | None, bias: bool, input_grad: bool) -> None:
    """The fused SEQ layer (no quantized weight kept for backward) gives the same outputs and
    gradients, bit for bit, as fake-quantizing the weight and calling F.linear."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 24, bias=bias)
    fused, plain = (QuantLinear.from_linear(linear, GridSpec("seq", 2, group_size)) for _ in range(2))
    with torch.no_grad():  # a scale below max|W| so that some weights are clipped
        fused.quantizer.delta.mul_(0.7)
        plain.quantizer.delta.copy_(fused.quantizer.delta)
    x = torch.randn(3, 5, 64)
    x_fused, x_plain = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
    out_fused = fused(x_fused)
    out_plain = torch.nn.functional.linear(x_plain, plain.quantizer.fake_quant(plain.weight), plain.bias)
    assert out_fused.grad_fn is not None and "SEQLinear" in type(out_fused.grad_fn).__name__
    grad = torch.randn_like(out_fused)
    out_fused.backward(grad)
    out_plain.backward(grad)
    assert torch.equal(out_fused, out_plain)
    pairs = [(fused.weight.grad, plain.weight.grad), (fused.quantizer.delta.grad, plain.quantizer.delta.grad)]
    pairs += [(fused.bias.grad, plain.bias.grad)] if bias else []
    pairs += [(x_fused.grad, x_plain.grad)] if input_grad else []
    for got, want in pairs:
        assert torch.equal(got, want)
    assert fused.weight.grad.abs().sum() > 0 and fused.quantizer.delta.grad.abs().sum() > 0


def test_fused_linear_keeps_no_quantized_weight_for_backward() -> None:
    """What autograd saves for the fused layer is the input, the latent weight and Delta only."""
    torch.manual_seed(0)
    quant = QuantLinear.from_linear(nn.Linear(64, 24), GridSpec("seq", 2, 16))
    x = torch.randn(4, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        quant(x)
    assert {t.data_ptr() for t in saved} == {x.data_ptr(), quant.weight.data_ptr()} | {
        t.data_ptr() for t in saved if t.shape == quant.quantizer.delta.shape}
    assert not any(t.shape == quant.weight.shape and t.data_ptr() != quant.weight.data_ptr() for t in saved)


def test_autocast_uses_the_unfused_path() -> None:
    quant = QuantLinear.from_linear(nn.Linear(64, 8), GridSpec("seq", 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quant(torch.randn(2, 64))
    assert out.dtype == torch.bfloat16 and "SEQLinear" not in type(out.grad_fn).__name__


def test_selection_skips_lm_head_and_respects_patterns(tiny_model) -> None:
    model, _ = tiny_model
    names = [n for n, _ in select_linears(model)]
    assert names and not any("lm_head" in n for n in names)
    assert all(n.startswith("model.layers.") for n in names)
    mlp_only = [n for n, _ in select_linears(model, include=[r"mlp\."])]
    assert mlp_only and all(".mlp." in n for n in mlp_only)
    no_down = [n for n, _ in select_linears(model, exclude=[r"lm_head", r"down_proj"])]
    assert not any("down_proj" in n for n in no_down)


def test_model_swap_pack_and_dequantize(tiny_model) -> None:
    model, _ = tiny_model
    ids = torch.randint(3, 100, (2, 12))
    names = quantize_model(model, GridSpec("seq", 2))
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    with torch.no_grad():
        fake = model(ids).logits
    pack_model(model, scale_dtype=torch.float32)
    assert all(isinstance(model.get_submodule(n), PackedLinear) for n in names)
    with torch.no_grad():
        packed = model(ids).logits
    torch.testing.assert_close(packed, fake, rtol=1e-4, atol=1e-4)
    dequantize_model(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fake, rtol=1e-4, atol=1e-4)


def test_no_quantizable_layers_is_clear_error() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="no quantizable linear layers"):
        quantize_model(model, GridSpec("seq", 2))


def test_group_size_error_names_the_layer(tiny_model) -> None:
    model, _ = tiny_model
    with pytest.raises(ValueError, match=r"cannot quantize model\.layers\.0\..*does not divide"):
        quantize_model(model, GridSpec("seq", 2, 48))
