"""Triton kernel vs the reference path, run in Triton's CPU interpreter, and the backend selection.

``TRITON_INTERPRET=1`` is set before Triton is imported, so ``@triton.jit`` builds interpreted
kernels that run on CPU tensors (no GPU needed). Layers are built from random codes, scales and
zero points (not from a quantizer), so every level, zero and group's parameters are exercised.
"""

from __future__ import annotations

import importlib
import os
import random

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` of the session
pytest.importorskip("triton")

from upq.grids import GridSpec, QuantizedWeight, decode
from upq.kernels import (
    BACKENDS,
    KernelUnsupported,
    NativeUnsupported,
    TritonUnsupported,
    choose_backend,
    load_triton,
    ops,
    packed_linear,
    reference_linear,
    triton_linear,
    triton_unsupported_reason,
)
from upq.modules import PackedLinear, set_backend
from upq.packing import unpack_codes

FORMATS = [("seq", 2), ("seq", 4), ("asym", 2), ("asym", 4), ("r2q", 2), ("asym", 3)]
# (out, in, group): odd N/K, K not a multiple of the 64-wide block, per-channel and grouped,
# and a group of 24 that no K block divides (per-weight parameter gather)
SHAPES = [(37, 100, None), (70, 96, 32), (5, 128, 64), (33, 256, 128), (9, 72, 24)]
BATCHES = [1, 3, 17]


@pytest.fixture(scope="module")
def tk():
    mod = load_triton()
    assert mod is not None, ops._triton_error
    if not mod.INTERPRETED:  # imported earlier without TRITON_INTERPRET: rebuild the kernel interpreted
        mod = importlib.reload(mod)
    assert mod.INTERPRETED
    return mod


def make_layer(out_f: int, in_f: int, spec: GridSpec, bias: bool = True, seed: int = 0) -> PackedLinear:
    """A packed layer with uniformly random codes, per-group scales over a 30x range and random zeros."""
    g = torch.Generator().manual_seed(seed)
    groups = in_f // spec.group_len(in_f)
    codes = torch.randint(0, spec.levels, (out_f, in_f), generator=g, dtype=torch.uint8)
    shape = (out_f, groups, 2) if spec.grid == "r2q" else (out_f, groups)
    scale = torch.rand(shape, generator=g) * 0.3 + 0.01
    zero = torch.randint(0, spec.levels, (out_f, groups), generator=g, dtype=torch.uint8) if spec.grid == "asym" else None
    b = torch.randn(out_f, generator=g) if bias else None
    return PackedLinear.from_quantized(QuantizedWeight(spec, codes, scale, zero), b)


def args(layer: PackedLinear) -> tuple:
    return layer.qweight, layer.scale, layer.zero, layer.bias, layer.spec, layer.in_features


def check(layer: PackedLinear, x: torch.Tensor, where: str) -> None:
    """Triton output vs a float64 oracle (bound-relative) and vs ``reference_linear``."""
    got = triton_linear(x, *args(layer))
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], layer.out_features), where
    codes = unpack_codes(layer.qweight, layer.spec.bits, layer.in_features)
    w64 = decode(QuantizedWeight(layer.spec, codes, layer.scale, layer.zero)).to(x.dtype).double()
    b64 = 0 if layer.bias is None else layer.bias.to(x.dtype).double()
    x64 = x.double()
    oracle = x64 @ w64.t() + b64
    bound = (x64.abs() @ w64.abs().t() + (b64.abs() if layer.bias is not None else 0)).max().item()
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[x.dtype] * max(bound, 1.0)
    err = (got.double() - oracle).abs().max().item()
    assert err <= tol, f"{where}: error {err:.3g} > {tol:.3g}"
    ref = reference_linear(x, *args(layer))
    torch.testing.assert_close(got.double(), ref.double(), rtol=0, atol=2 * tol, msg=where)


@pytest.mark.parametrize("grid,bits", FORMATS)
def test_matches_reference(tk, grid: str, bits: int) -> None:
    for out_f, in_f, group in SHAPES:
        spec = GridSpec(grid, bits, group)
        layer = make_layer(out_f, in_f, spec, seed=out_f * in_f)
        for batch in BATCHES:
            x = torch.randn(batch, in_f)
            check(layer, x, f"{spec.describe()} {out_f}x{in_f} batch {batch}")


def test_random_shapes(tk) -> None:
    rng = random.Random(1234)
    for case in range(8):
        grid, bits = FORMATS[case % len(FORMATS)]
        group = rng.choice([None, 32, 64, 128])
        in_f = rng.randrange(1, 160) if group is None else group * rng.randint(1, 3)
        out_f, batch = rng.randint(1, 90), rng.choice([1, 2, 3, 17, 70])
        spec = GridSpec(grid, bits, group)
        layer = make_layer(out_f, in_f, spec, bias=case % 2 == 0, seed=case)
        check(layer, torch.randn(batch, in_f), f"case {case}: {spec.describe()} {out_f}x{in_f} batch {batch}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs(tk, dtype: torch.dtype) -> None:
    for (grid, bits), (out_f, in_f, group) in zip(FORMATS[:4], SHAPES[:4]):
        layer = make_layer(out_f, in_f, GridSpec(grid, bits, group), seed=7)
        for batch in (1, 17):
            check(layer, torch.randn(batch, in_f).to(dtype), f"{layer.spec.describe()} {dtype} batch {batch}")


def test_zero_points_and_groups_are_read_per_group(tk) -> None:
    """Changing one group's zero point or scale changes exactly that group's contribution."""
    layer = make_layer(6, 96, GridSpec("asym", 4, 32), bias=False, seed=3)
    x = torch.randn(2, 96)
    base = triton_linear(x, *args(layer))
    layer.zero[4, 1] = (int(layer.zero[4, 1]) + 5) % 16
    layer.scale[1, 2] *= 3
    moved = triton_linear(x, *args(layer))
    changed = (moved - base).abs().amax(dim=0) > 1e-4
    assert changed.tolist() == [False, True, False, False, True, False]
    torch.testing.assert_close(moved, reference_linear(x, *args(layer)), rtol=1e-5, atol=1e-5)


def test_nd_empty_and_strided_inputs(tk) -> None:
    layer = make_layer(12, 64, GridSpec("seq", 2, 32))
    x = torch.randn(2, 5, 64)
    out = triton_linear(x, *args(layer))
    assert out.shape == (2, 5, 12)
    torch.testing.assert_close(out, reference_linear(x, *args(layer)), rtol=1e-5, atol=1e-5)
    assert triton_linear(torch.randn(0, 64), *args(layer)).shape == (0, 12)
    xt = torch.randn(64, 20).t()  # non-contiguous rows
    torch.testing.assert_close(triton_linear(xt, *args(layer)), reference_linear(xt, *args(layer)), rtol=1e-5, atol=1e-5)


def test_block_sizes(tk) -> None:
    half, fp32 = torch.float16, torch.float32
    assert tk.block_sizes(1, 128, 256, half) == (1, 32, 64, True, 4)  # GEMV step
    assert tk.block_sizes(3, 32, 96, fp32) == (4, 32, 32, True, 4)
    assert tk.block_sizes(17, 100, 100, half) == (32, 64, 64, True, 8)  # per-channel: one group spans K
    assert tk.block_sizes(100, 24, 72, half) == (64, 64, 64, False, 8)  # group of 24: gather per weight
    assert tk.block_sizes(100, 128, 256, fp32) == (16, 64, 32, True, 4)


# ---- backend selection -------------------------------------------------------------------------


def test_choose_backend_rules() -> None:
    asked: list[str] = []

    def ok(kernel: str) -> str | None:
        asked.append(kernel)
        return None

    assert "triton" in BACKENDS
    assert choose_backend("auto", "cuda", ok) == ("triton", None)
    assert choose_backend("auto", "cpu", ok) == ("native", None)
    assert asked == ["triton", "native"]
    assert choose_backend("reference", "cuda", ok) == ("reference", None)
    assert choose_backend("triton", "cuda", ok) == ("triton", None)
    assert choose_backend("native", "cpu", ok) == ("native", None)
    kernel, reason = choose_backend("auto", "mps", ok)
    assert kernel == "reference" and "mps" in reason
    assert asked == ["triton", "native", "triton", "native"]  # reference/mps asked no kernel

    def no(kernel: str) -> str | None:
        return f"{kernel} says no"

    assert choose_backend("auto", "cuda", no) == ("reference", "triton says no")
    assert choose_backend("auto", "cpu", no) == ("reference", "native says no")
    with pytest.raises(TritonUnsupported, match="triton says no") as info:
        choose_backend("triton", "cpu", no)
    assert isinstance(info.value, KernelUnsupported)
    with pytest.raises(NativeUnsupported, match="native says no"):
        choose_backend("native", "cuda", no)
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend("fast", "cpu", ok)


def test_triton_reasons(tk, monkeypatch) -> None:
    cuda = torch.device("cuda")  # a device object needs no GPU
    for grid, bits in FORMATS:
        assert triton_unsupported_reason(GridSpec(grid, bits, 32), 64, cuda, torch.float16) is None
    assert "8-bit" in triton_unsupported_reason(GridSpec("asym", 8, None), 64, cuda, torch.float32)
    assert "dtype" in triton_unsupported_reason(GridSpec("seq", 2, None), 64, cuda, torch.float64)
    assert triton_unsupported_reason(GridSpec("seq", 2, None), 64, "cpu", torch.float32) is None  # interpreter
    monkeypatch.setattr(tk, "INTERPRETED", False)
    assert "CUDA" in triton_unsupported_reason(GridSpec("seq", 2, None), 64, "cpu", torch.float32)
    monkeypatch.setattr(ops, "_triton_module", None)
    monkeypatch.setattr(ops, "_triton_error", "simulated: not installed")
    assert "simulated" in triton_unsupported_reason(GridSpec("seq", 2, None), 64, cuda, torch.float32)
    layer = make_layer(8, 64, GridSpec("seq", 2, None))
    with pytest.raises(TritonUnsupported, match="simulated"):
        packed_linear(torch.randn(2, 64), *args(layer), backend="triton")


def test_packed_linear_and_module_dispatch(tk) -> None:
    layer = make_layer(24, 64, GridSpec("asym", 4, 32))
    x = torch.randn(4, 64)
    ref = reference_linear(x, *args(layer))
    torch.testing.assert_close(packed_linear(x, *args(layer), backend="triton"), ref, rtol=1e-5, atol=1e-5)
    layer.backend = "triton"
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TritonUnsupported, match="backward"):
        layer(x.clone().requires_grad_(True))
    with pytest.raises(TritonUnsupported, match="8-bit"):
        packed_linear(x, *args(make_layer(8, 64, GridSpec("asym", 8, None))), backend="triton")
    model = torch.nn.Sequential(make_layer(64, 64, GridSpec("seq", 2, None)), torch.nn.ReLU(), layer)
    layer.backend = "auto"
    assert set_backend(model, "triton") == 2
    with torch.no_grad():
        assert torch.allclose(model(x), layer(model[1](model[0](x))))
    set_backend(model, "reference")
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_linear(torch.relu(reference_linear(x, *args(model[0]))),
                                                              *args(layer)), rtol=1e-5, atol=1e-5)
