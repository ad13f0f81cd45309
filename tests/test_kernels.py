"""Native CPU kernel vs the reference path (dequantize then matmul), and the backend dispatch.

The kernel is compiled on first use (~40 s once, cached in ``~/.cache/upq/kernels``); these
tests are skipped only when there is no C++ compiler at all.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

from upq.grids import GridSpec, QuantizedWeight, decode
from upq.kernels import (
    NativeUnsupported,
    load_native,
    native_error,
    native_linear,
    native_unsupported_reason,
    packed_linear,
    reference_linear,
)
from upq.modules import PackedLinear, QuantLinear, pack_model, quantize_model, set_backend
from upq.packing import unpack_codes

_CXX = os.environ.get("CXX", "c++")
pytestmark = pytest.mark.skipif(shutil.which(_CXX) is None and shutil.which("g++") is None,
                                reason=f"no C++ compiler ({_CXX}/g++) on PATH: the native kernel cannot be built")

FORMATS = [("seq", 2), ("seq", 4), ("asym", 2), ("asym", 4), ("r2q", 2), ("seq", 3), ("asym", 3)]
# (out, in): odd sizes that are not multiples of any block (16/8 lanes x 4/2 codes per byte)
SHAPES = [(37, 96), (5, 100), (64, 256), (33, 384), (3, 18)]
GROUPS = [None, 32, 64, 128]
BATCHES = [1, 3, 16, 33]


@pytest.fixture(scope="module")
def ext():
    mod = load_native()
    assert mod is not None, f"the native kernel failed to build: {native_error()}"
    return mod


def isas(ext) -> list[str]:
    order = ["scalar", "avx2", "avx512"]
    return order[: order.index(ext.best_isa()) + 1]


def make_layer(out_f: int, in_f: int, spec: GridSpec, bias: bool = True, seed: int = 0) -> PackedLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(out_f, 1) * 3 + 0.1)  # rows of different scales
    return QuantLinear.from_linear(linear, spec).to_packed()


def exact_weight(layer: PackedLinear) -> torch.Tensor:
    codes = unpack_codes(layer.qweight, layer.spec.bits, layer.in_features)
    return decode(QuantizedWeight(layer.spec, codes, layer.scale, layer.zero))


def args(layer: PackedLinear) -> tuple:
    return layer.qweight, layer.scale, layer.zero, layer.bias, layer.spec, layer.in_features


def cases():
    for out_f, in_f in SHAPES:
        for g in GROUPS:
            if g is None or in_f % g == 0:
                yield out_f, in_f, g


@pytest.mark.parametrize("grid,bits", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_matches_reference(ext, grid: str, bits: int, dtype: torch.dtype) -> None:
    checked = 0
    for out_f, in_f, g in cases():
        spec = GridSpec(grid, bits, g)
        layer = make_layer(out_f, in_f, spec, seed=out_f + in_f)
        w64 = exact_weight(layer).double()
        for isa in isas(ext):
            if native_unsupported_reason(spec, in_f, isa=isa) is not None:
                assert g is not None and g < 64, f"{spec.describe()} unexpectedly unsupported on {isa}"
                continue
            for batch in BATCHES:
                x = torch.randn(batch, in_f).to(dtype)
                got = native_linear(x, *args(layer), isa=isa)
                assert got.dtype == dtype and got.shape == (batch, out_f)
                oracle = x.double() @ w64.t() + layer.bias.double()
                ref = reference_linear(x, *args(layer))
                bound = (x.double().abs() @ w64.abs().t() + layer.bias.double().abs()).max().item()
                tol = (2e-6 if dtype == torch.float32 else 1.6e-2) * bound
                err = (got.double() - oracle).abs().max().item()
                ref_err = (ref.double() - oracle).abs().max().item()
                where = f"{spec.describe()} {out_f}x{in_f} batch {batch} {isa} {dtype}"
                assert err <= tol, f"{where}: native error {err:.3g} > {tol:.3g}"
                assert err <= max(2 * ref_err, tol / 4), f"{where}: native {err:.3g} vs reference {ref_err:.3g}"
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("grid,bits", FORMATS)
def test_native_weights_are_bit_identical(ext, grid: str, bits: int) -> None:
    """The kernel's unpacker yields exactly the reference dequantizer's float32 weights."""
    from upq.grids import GRIDS
    from upq.kernels.ops import ISA_IDS

    for out_f, in_f, g in cases():
        spec = GridSpec(grid, bits, g)
        layer = make_layer(out_f, in_f, spec, bias=False)
        for isa in isas(ext):
            if native_unsupported_reason(spec, in_f, isa=isa) is not None:
                continue
            w = ext.dequantize(layer.qweight, layer.scale, layer.zero, in_f, GRIDS[grid].kernel_id, bits,
                               spec.group_len(in_f), ISA_IDS[isa])
            assert torch.equal(w, exact_weight(layer)), f"{spec.describe()} {out_f}x{in_f} {isa}"


def test_decode_and_prefill_paths_agree(ext) -> None:
    spec = GridSpec("asym", 2, 32)
    layer = make_layer(70, 160, spec)
    x = torch.randn(24, 160)
    gemv = native_linear(x, *args(layer), gemv_max_batch=64)
    tiled = native_linear(x, *args(layer), gemv_max_batch=0)
    torch.testing.assert_close(gemv, tiled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scale_dtypes(ext, scale_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 20)
    layer = QuantLinear.from_linear(linear, GridSpec("seq", 4, 32)).to_packed(scale_dtype=scale_dtype)
    x = torch.randn(3, 96)
    torch.testing.assert_close(native_linear(x, *args(layer)), reference_linear(x, *args(layer)), rtol=1e-5, atol=1e-5)


def test_empty_and_nd_inputs(ext) -> None:
    layer = make_layer(12, 64, GridSpec("seq", 2, None))
    x = torch.randn(2, 5, 64)
    out = native_linear(x, *args(layer))
    assert out.shape == (2, 5, 12)
    torch.testing.assert_close(out, reference_linear(x, *args(layer)), rtol=1e-5, atol=1e-5)
    assert native_linear(torch.randn(0, 64), *args(layer)).shape == (0, 12)
    assert native_linear(torch.randn(40, 64).t().contiguous().t(), *args(layer)).shape == (40, 12)


def test_packed_linear_dispatch(ext) -> None:
    layer = make_layer(24, 64, GridSpec("asym", 4, 32))
    x = torch.randn(4, 64)
    ref = reference_linear(x, *args(layer))
    for backend in ("auto", "native", "reference"):
        layer.backend = backend
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    # a gradient for x is needed: auto falls back to the reference path, native refuses
    xg = x.clone().requires_grad_(True)
    layer.backend = "auto"
    layer(xg).sum().backward()
    assert xg.grad is not None
    layer.backend = "native"
    with pytest.raises(NativeUnsupported, match="backward"):
        layer(xg)
    with pytest.raises(ValueError, match="unknown backend"):
        packed_linear(x, *args(layer), backend="fast")


def test_unsupported_format_falls_back(ext) -> None:
    layer = make_layer(8, 64, GridSpec("asym", 8, None))  # 8-bit storage has no native kernel
    x = torch.randn(2, 64)
    assert "8-bit" in native_unsupported_reason(layer.spec, 64)
    ref = reference_linear(x, *args(layer))
    torch.testing.assert_close(packed_linear(x, *args(layer), backend="auto"), ref)
    with pytest.raises(NativeUnsupported, match="8-bit"):
        packed_linear(x, *args(layer), backend="native")


def test_unavailable_kernel_falls_back(monkeypatch) -> None:
    import upq.kernels.native as native

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_error", "simulated: no compiler")
    layer = make_layer(8, 64, GridSpec("seq", 2, None))
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), reference_linear(x, *args(layer)))
    layer.backend = "native"
    with pytest.raises(NativeUnsupported, match="simulated"):
        layer(x)


def test_model_logits_and_generation_native_vs_reference(ext, tiny_model) -> None:
    model, tokenizer = tiny_model
    quantize_model(model, GridSpec("seq", 2, 32))
    pack_model(model)
    ids = torch.tensor([tokenizer("The quick brown fox")["input_ids"]])
    assert set_backend(model, "reference") == 14
    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    set_backend(model, "native")
    with torch.no_grad():
        nat = model(ids).logits
        nat_gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(nat, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(nat_gen, ref_gen)
    with pytest.raises(ValueError, match="unknown backend"):
        set_backend(model, "triton-ish")
