"""Property tests for every grid x group size, and the analytic SEQ gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from upq.grids import GridSpec, decode, make_quantizer
from upq.grids.base import parse_group_size, to_groups
from upq.grids.seq import EPS, seq_fake_quant

GRID_BITS = [("seq", 2), ("seq", 3), ("seq", 4), ("asym", 2), ("asym", 4), ("r2q", 2)]
GROUPS = [None, 32, 64, 128]


@st.composite
def weights(draw, in_features: int = 256):
    seed = draw(st.integers(0, 2**31 - 1))
    rows = draw(st.integers(1, 6))
    scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 30.0]))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, in_features, generator=gen) * scale
    if draw(st.booleans()):  # outliers
        w[0, seed % in_features] *= 20
    return w


@pytest.mark.parametrize("grid,bits", GRID_BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@settings(max_examples=15, deadline=None)
@given(w=weights())
def test_codes_levels_and_idempotence(grid: str, bits: int, group_size: int | None, w: torch.Tensor) -> None:
    spec = GridSpec(grid, bits, group_size)
    quantizer = make_quantizer(spec, w)
    q = quantizer.encode(w)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert int(q.codes.max()) < 2**bits
    w_hat = decode(q)
    group_len = spec.group_len(w.shape[1])
    for row in to_groups(w_hat, group_len).reshape(-1, group_len):
        assert row.unique().numel() <= 2**bits
    # the fake-quant forward is exactly the decoded weight
    torch.testing.assert_close(quantizer.fake_quant(w), w_hat, rtol=1e-6, atol=1e-6 * float(w.abs().max()))
    # quantizing an already-quantized weight with the same parameters changes nothing
    if grid != "r2q":  # r2q parameters are a function of the weight; checked separately below
        again = quantizer.encode(w_hat)
        assert torch.equal(again.codes, q.codes)
        torch.testing.assert_close(decode(again), w_hat)


@pytest.mark.parametrize("group_size", GROUPS)
@settings(max_examples=15, deadline=None)
@given(w=weights())
def test_r2q_lattice(group_size: int | None, w: torch.Tensor) -> None:
    spec = GridSpec("r2q", 2, group_size)
    quantizer = make_quantizer(spec, w)
    q = quantizer.encode(w)
    a1, a2 = q.scale[..., 0], q.scale[..., 1]
    groups = to_groups(w, spec.group_len(w.shape[1]))
    torch.testing.assert_close(a1, groups.abs().mean(-1))
    w_hat = to_groups(decode(q), spec.group_len(w.shape[1]))
    lattice = torch.stack([-a1 - a2, -a1 + a2, a1 - a2, a1 + a2], dim=-1)  # (out, G, 4)
    dist = (w_hat.unsqueeze(-1) - lattice.unsqueeze(-2)).abs().amin(-1)
    assert float(dist.max()) < 1e-5 * (1 + float(w.abs().max()))
    # first-stage sign is the weight's sign
    assert torch.equal((q.codes >> 1).bool(), w >= 0)


@settings(max_examples=30, deadline=None)
@given(w=weights(), group_size=st.sampled_from(GROUPS))
def test_seq_int4_nests_into_int2(w: torch.Tensor, group_size: int | None) -> None:
    spec4 = GridSpec("seq", 4, group_size)
    w4 = decode(make_quantizer(spec4, w).encode(w))
    for delta_from in ("delta4", "max_int4"):
        q2 = make_quantizer(GridSpec("seq", 2, group_size), w4)  # Delta2 = max|W_int4| per group
        if delta_from == "delta4":
            q2.delta.data = make_quantizer(spec4, w).delta.data.clone()
        group_len = spec4.group_len(w.shape[1])
        x = (to_groups(w4, group_len) / q2.delta.detach().unsqueeze(-1)).clamp(-1 + EPS, 1 - EPS)
        # no INT4 level sits on an INT2 decision boundary (ties): 2x - 0.5 is never a half-integer
        frac = (2 * x - 0.5 - torch.floor(2 * x - 0.5) - 0.5).abs()
        assert float(frac.min()) > 1e-3
        w2 = decode(q2.encode(w4))
        # each distinct INT4 value maps to one INT2 value and keeps its sign
        for a, b in zip(w4.flatten().tolist(), w2.flatten().tolist()):
            assert (a > 0) == (b > 0)
        pairs = torch.stack([w4.flatten(), w2.flatten()], dim=1).unique(dim=0)
        assert pairs[:, 0].unique().numel() == pairs.shape[0]


def _seq_reference_grads(w: torch.Tensor, delta: torch.Tensor, grad_out: torch.Tensor, bits: int):
    """The LSQ formula of DESIGN section 2.1, written out element by element."""
    n = 2 ** (bits - 1)
    scale = 1 / math.sqrt(w.numel() * max(n - 1, 1))
    gw = torch.zeros_like(w)
    gd = torch.zeros_like(delta)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            x = w[i, j] / delta[i, 0]
            q = (torch.round(n * torch.clamp(x, -1 + EPS, 1 - EPS) - 0.5) + 0.5) / n
            if -1 + EPS < x < 1 - EPS:
                gw[i, j] = grad_out[i, j]
                gd[i, 0] += grad_out[i, j] * (q - x)
            else:
                gd[i, 0] += grad_out[i, j] * torch.sign(x) * (n - 0.5) / n
    return gw, gd * scale


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_seq_gradients_match_lsq_formula(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    delta = (w.abs().amax(-1, keepdim=True) * 0.7).requires_grad_(True)  # some weights get clipped
    w.requires_grad_(True)
    grad_out = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    seq_fake_quant(w, delta, bits).backward(grad_out)
    gw, gd = _seq_reference_grads(w.detach(), delta.detach(), grad_out, bits)
    torch.testing.assert_close(w.grad, gw)
    torch.testing.assert_close(delta.grad, gd)


def test_seq_int2_levels() -> None:
    w = torch.tensor([[-1.0, -0.6, -0.1, 0.1, 0.6, 1.0]])
    q = make_quantizer(GridSpec("seq", 2), w)
    assert decode(q.encode(w)).tolist() == [[-0.75, -0.75, -0.25, 0.25, 0.75, 0.75]]


def test_asym_dynamic_gradient_flows_to_weight() -> None:
    w = torch.randn(3, 64, requires_grad=True)
    quantizer = make_quantizer(GridSpec("asym", 2, 32), w)
    quantizer.fake_quant(w).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_asym_learned_scale_gets_gradient() -> None:
    w = torch.randn(3, 64)
    quantizer = make_quantizer(GridSpec("asym", 4, 32), w, learn_scale=True)
    (quantizer.fake_quant(w) ** 2).sum().backward()
    assert quantizer.scale.grad is not None and quantizer.scale.grad.abs().sum() > 0


def test_bad_specs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="supports bits"):
        GridSpec("seq", 5)
    with pytest.raises(ValueError, match="supports bits"):
        GridSpec("r2q", 4)
    with pytest.raises(ValueError, match="unknown grid"):
        GridSpec("nf4", 4)
    with pytest.raises(ValueError, match="does not divide in_features=100"):
        make_quantizer(GridSpec("seq", 2, 64), torch.randn(4, 100))
    assert parse_group_size("channel") is None and parse_group_size("128") == 128
    with pytest.raises(ValueError, match="group size"):
        parse_group_size("big")


def test_seq_mse_scale_beats_max_and_keeps_exact_grids() -> None:
    from upq.grids.seq import seq_codes, seq_levels, seq_mse_scale

    def err(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        d = delta.unsqueeze(-1)
        return (seq_levels(seq_codes(w, d, 2), d, 2) - w).pow(2).sum(-1)

    w = torch.randn(8, 4, 64, generator=torch.Generator().manual_seed(0))
    best = seq_mse_scale(w, 2)
    peak = w.abs().amax(-1)
    assert best.shape == peak.shape and ((best >= 0.2 * peak - 1e-6) & (best <= peak * 4 / 3 + 1e-6)).all()
    assert (err(w, best) <= err(w, peak) + 1e-6).all()
    assert err(w, best).sum() < 0.8 * err(w, peak).sum()  # Gaussian groups: a clear gain at 2 bits
    # weights already on a 2-bit SEQ grid (Delta = max|w| / 0.75) are found exactly
    on_grid = torch.tensor([[[0.75, -0.75, 0.25, -0.25, 0.25, 0.75]]]) * 2.0
    found = seq_mse_scale(on_grid, 2)
    assert found.item() == pytest.approx(2.0) and err(on_grid, found).item() == pytest.approx(0.0, abs=1e-10)
