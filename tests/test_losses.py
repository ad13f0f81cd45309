"""Tests for upq.distill.losses against direct float64 references."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from torch import Tensor

from upq.distill.losses import (
    LOSSES,
    cakld,
    chunked_loss,
    estimate_cakld_gamma,
    forward_kl,
    generalized_jsd,
    get_loss,
    next_token_ce,
    reverse_kl,
)

V = 13
SHAPE = (2, 6, V)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threads only add OpenMP contention on a busy 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- float64 references


def _probs(logits: Tensor) -> Tensor:
    return torch.softmax(logits.double(), dim=-1)


def _ref_kl_rows(p: Tensor, q: Tensor) -> Tensor:
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros((), dtype=p.dtype)).sum(-1)


def _masked_mean(rows: Tensor, mask: Optional[Tensor]) -> Tensor:
    if mask is None:
        return rows.mean()
    m = mask.double()
    return (rows * m).sum() / m.sum()


def ref_gjsd_raw(s: Tensor, t: Tensor, beta: float, mask: Optional[Tensor] = None) -> Tensor:
    """beta KL(P_T||M) + (1-beta) KL(P_S||M), M = beta P_T + (1-beta) P_S, plain float64."""
    p_t, p_s = _probs(t), _probs(s)
    m = beta * p_t + (1 - beta) * p_s
    rows = beta * _ref_kl_rows(p_t, m) + (1 - beta) * _ref_kl_rows(p_s, m)
    return _masked_mean(rows, mask)


def ref_forward_kl(s: Tensor, t: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    return _masked_mean(_ref_kl_rows(_probs(t), _probs(s)), mask)


def ref_reverse_kl(s: Tensor, t: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    return _masked_mean(_ref_kl_rows(_probs(s), _probs(t)), mask)


def ref_chi2(s: Tensor, t: Tensor) -> Tensor:
    """chi2(P_T||P_S) = sum P_T^2 / P_S - 1, mean over tokens."""
    p_t, p_s = _probs(t), _probs(s)
    return ((p_t**2 / p_s).sum(-1) - 1).mean()


@pytest.fixture()
def logits() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    s = 2.0 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    t = 2.0 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    mask = torch.rand(SHAPE[:-1], generator=g) > 0.3
    mask[0, 0] = True
    return s, t, mask


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gjsd_matches_float64_reference(logits, beta, dtype):
    s, t, mask = logits
    raw = ref_gjsd_raw(s, t, beta, mask)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    got_raw = generalized_jsd(s.to(dtype), t.to(dtype), beta, mask, normalized=False)
    got_norm = generalized_jsd(s.to(dtype), t.to(dtype), beta, mask)
    assert got_raw.dtype == dtype
    torch.testing.assert_close(got_raw.double(), raw, **tol)
    torch.testing.assert_close(got_norm.double(), raw / (beta * (1 - beta)), **tol)


def test_gjsd_mixture_weights_not_swapped(logits):
    s, t, mask = logits
    beta = 0.1
    got = generalized_jsd(s, t, beta, mask, normalized=False)
    # The classic bug: M = (1-beta) P_T + beta P_S while keeping the outer weights.
    p_t, p_s = _probs(t), _probs(s)
    m_bad = (1 - beta) * p_t + beta * p_s
    bad_rows = beta * _ref_kl_rows(p_t, m_bad) + (1 - beta) * _ref_kl_rows(p_s, m_bad)
    bad = _masked_mean(bad_rows, mask)
    torch.testing.assert_close(got, ref_gjsd_raw(s, t, beta, mask), rtol=1e-12, atol=0)
    assert abs(float(got - bad)) > 1e-2


def test_gjsd_endpoints_are_exact_kls(logits):
    s, t, mask = logits
    fwd, rev = ref_forward_kl(s, t, mask), ref_reverse_kl(s, t, mask)
    torch.testing.assert_close(generalized_jsd(s, t, 0.0, mask), fwd, rtol=1e-12, atol=0)
    torch.testing.assert_close(generalized_jsd(s, t, 1, mask), rev, rtol=1e-12, atol=0)
    torch.testing.assert_close(forward_kl(s, t, mask), fwd, rtol=1e-12, atol=0)
    torch.testing.assert_close(reverse_kl(s, t, mask), rev, rtol=1e-12, atol=0)
    s32, t32 = s.float(), t.float()
    torch.testing.assert_close(forward_kl(s32, t32, mask).double(), fwd, rtol=1e-5, atol=0)
    torch.testing.assert_close(reverse_kl(s32, t32, mask).double(), rev, rtol=1e-5, atol=0)


def test_gjsd_continuous_at_both_ends(logits):
    s, t, _ = logits
    fwd, rev = ref_forward_kl(s, t), ref_reverse_kl(s, t)
    eps = 1e-6
    # First-order expansion: L(beta) = KL_f + beta (KL_f - chi2(P_T||P_S)/2) + O(beta^2).
    slope0 = (generalized_jsd(s, t, eps) - fwd) / eps
    torch.testing.assert_close(slope0, fwd - ref_chi2(s, t) / 2, rtol=2e-3, atol=0)
    slope1 = (generalized_jsd(s, t, 1 - eps) - rev) / eps
    torch.testing.assert_close(slope1, rev - ref_chi2(t, s) / 2, rtol=2e-3, atol=0)
    # float32 stays accurate that close to the ends (no catastrophic cancellation).
    for beta in (1e-6, 1e-9, 1 - 1e-6):
        f32 = generalized_jsd(s.float(), t.float(), beta).double()
        torch.testing.assert_close(f32, generalized_jsd(s, t, beta), rtol=1e-5, atol=1e-6)
    # and the direct float64 formula agrees at beta = 1e-6
    torch.testing.assert_close(
        generalized_jsd(s, t, eps), ref_gjsd_raw(s, t, eps) / (eps * (1 - eps)), rtol=1e-6, atol=0
    )


def test_symmetric_jsd_bounded_by_log2():
    g = torch.Generator().manual_seed(1)
    s = 3.0 * torch.randn(64, V, generator=g)
    t = 3.0 * torch.randn(64, V, generator=g)
    assert float(generalized_jsd(s, t, 0.5, normalized=False)) <= math.log(2)
    # disjoint supports reach the bound
    s_far = torch.full((4, V), -60.0)
    t_far = torch.full((4, V), -60.0)
    s_far[:, 0] = 60.0
    t_far[:, 1] = 60.0
    val = float(generalized_jsd(s_far, t_far, 0.5, normalized=False))
    assert math.log(2) - 1e-5 < val <= math.log(2) + 1e-6


@pytest.mark.parametrize("name,kw", [
    ("gjsd", {"beta": 0.0}), ("gjsd", {"beta": 0.1}), ("gjsd", {"beta": 0.5}),
    ("gjsd", {"beta": 1.0}), ("gjsd", {"beta": 0.5, "normalized": False}),
    ("forward_kl", {}), ("reverse_kl", {}), ("cakld", {"gamma": 0.4}),
])
def test_divergence_of_identical_distributions_is_zero(logits, name, kw):
    s, _, mask = logits
    x = s.float().requires_grad_()
    val = get_loss(name)(x, s.float(), mask, **kw)
    val.backward()
    assert abs(val.item()) < 1e-6
    assert float(x.grad.abs().max()) < 1e-6


def test_cakld_matches_reference(logits):
    s, t, mask = logits
    for gamma in (0.0, 0.35, 1.0):
        want = gamma * ref_reverse_kl(s, t, mask) + (1 - gamma) * ref_forward_kl(s, t, mask)
        torch.testing.assert_close(cakld(s, t, gamma, mask), want, rtol=1e-12, atol=1e-15)


def test_next_token_ce_matches_cross_entropy(logits):
    s, _, mask = logits
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, V, SHAPE[:-1], generator=g)
    labels[1, 2] = -100
    want_labels = labels.masked_fill(~mask, -100)
    want = torch.nn.functional.cross_entropy(s.reshape(-1, V), want_labels.reshape(-1))
    torch.testing.assert_close(next_token_ce(s, labels, mask), want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="labels must be in"):
        next_token_ce(s, labels.clamp(min=0) + V)


# ---------------------------------------------------------------- masking, reduction, dtype


@pytest.mark.parametrize("name,kw", [
    ("gjsd", {"beta": 0.1}), ("gjsd", {"beta": 1.0}), ("forward_kl", {}), ("reverse_kl", {}),
    ("cakld", {"gamma": 0.5}), ("ntp", {}),
])
def test_masked_tokens_do_not_matter(logits, name, kw):
    s, t, mask = logits
    labels = torch.randint(0, V, SHAPE[:-1], generator=torch.Generator().manual_seed(3))
    spec = get_loss(name)
    garbage = s.clone()
    garbage[~mask] = float("nan")
    garbage_t = t.clone()
    garbage_t[~mask] = float("inf")
    x = garbage.requires_grad_()
    got = spec(x, garbage_t, mask, labels=labels, **kw)
    got.backward()
    want = spec(s[mask], t[mask], labels=labels[mask], **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~mask] == 0).all()


def test_reduction_sum_and_empty_mask(logits):
    s, t, mask = logits
    total = generalized_jsd(s, t, 0.3, mask, reduction="sum")
    torch.testing.assert_close(total / mask.sum(), generalized_jsd(s, t, 0.3, mask))
    x = s.clone().requires_grad_()
    empty = generalized_jsd(x, t, 0.3, torch.zeros(SHAPE[:-1], dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and (x.grad == 0).all()
    with pytest.raises(ValueError, match="reduction"):
        forward_kl(s, t, reduction="max")  # type: ignore[arg-type]


def test_neg_inf_logits_handled(logits):
    """Vocabulary slots with -inf logits in both models (0 log 0) give finite values/grads."""
    s, t, _ = logits
    s2, t2 = s.clone(), t.clone()
    s2[..., :3] = float("-inf")
    t2[..., :3] = float("-inf")
    for name, kw in [("gjsd", {"beta": 0.2}), ("gjsd", {"beta": 0.8}), ("forward_kl", {}),
                     ("reverse_kl", {}), ("cakld", {"gamma": 0.3})]:
        x = s2.clone().requires_grad_()
        val = get_loss(name)(x, t2, **kw)
        val.backward()
        want = get_loss(name)(s[..., 3:], t[..., 3:], **kw)
        torch.testing.assert_close(val, want, rtol=1e-12, atol=1e-15)
        assert torch.isfinite(x.grad).all()
    # gJSD stays finite even where only one model has a zero
    s3 = s.clone()
    s3[..., 0] = float("-inf")
    for beta in (0.3, 0.7):
        x = s3.clone().requires_grad_()
        val = generalized_jsd(x, t, beta)
        val.backward()
        want = ref_gjsd_raw(s3, t, beta) / (beta * (1 - beta))
        torch.testing.assert_close(val, want, rtol=1e-12, atol=0)
        assert torch.isfinite(x.grad).all()


def test_bf16_inputs_are_upcast(logits):
    s, t, mask = logits
    sb = s.to(torch.bfloat16).requires_grad_()
    val = generalized_jsd(sb, t.to(torch.bfloat16), 0.5, mask)
    assert val.dtype == torch.float32
    want = generalized_jsd(s.to(torch.bfloat16).float(), t.to(torch.bfloat16).float(), 0.5, mask)
    torch.testing.assert_close(val, want)
    val.backward()
    assert sb.grad is not None and sb.grad.dtype == torch.bfloat16


def test_argument_errors(logits):
    s, t, mask = logits
    with pytest.raises(ValueError, match="valid names: cakld, forward_kl, gjsd, ntp, reverse_kl"):
        get_loss("jsd")
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd(s, t, 1.5)
    with pytest.raises(ValueError, match="identically 0"):
        generalized_jsd(s, t, 0.0, normalized=False)
    with pytest.raises(ValueError, match="gamma must be in"):
        cakld(s, t, -0.1)
    with pytest.raises(ValueError, match="mask shape"):
        forward_kl(s, t, mask[:, :3])
    with pytest.raises(ValueError, match="teacher_logits shape"):
        forward_kl(s, t[..., :5])
    assert set(LOSSES) == {"gjsd", "forward_kl", "reverse_kl", "cakld", "ntp"}


# ---------------------------------------------------------------- CAKLD gamma


def test_estimate_cakld_gamma_on_crafted_logits():
    b1 = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.25, 0.25, 0.5], [1.0, 1e-9, 1e-9]]]))
    m1 = torch.tensor([[True, True, False]])  # third token excluded
    b2 = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))  # (1, V): one token, no mask
    gamma = estimate_cakld_gamma([b1, b2], [m1, None])
    assert gamma == pytest.approx((0.7 + 0.5 + 0.6) / 3, abs=1e-6)
    assert estimate_cakld_gamma([b1]) == pytest.approx((0.7 + 0.5 + 1.0) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="no valid tokens"):
        estimate_cakld_gamma([b1], [torch.zeros(1, 3, dtype=torch.bool)])


# ---------------------------------------------------------------- gradients


GRAD_CASES = [
    ("gjsd", {"beta": 0.0}), ("gjsd", {"beta": 0.1}), ("gjsd", {"beta": 0.5}),
    ("gjsd", {"beta": 0.9}), ("gjsd", {"beta": 1.0}), ("gjsd", {"beta": 0.1, "normalized": False}),
    ("forward_kl", {}), ("reverse_kl", {}), ("cakld", {"gamma": 0.3}), ("ntp", {}),
]


@pytest.mark.parametrize("name,kw", GRAD_CASES)
def test_gradcheck_plain(name, kw):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    spec = get_loss(name)
    assert torch.autograd.gradcheck(lambda x: spec(x, t, mask, labels=labels, **kw), (s,))


def _linear_head(weight: Tensor, bias: Optional[Tensor] = None):
    return lambda h: torch.nn.functional.linear(h, weight, bias)


@pytest.mark.parametrize(
    "name,kw", [("gjsd", {"beta": 0.1}), ("cakld", {"gamma": 0.6}), ("ntp", {})]
)
def test_gradcheck_chunked(name, kw):
    g = torch.Generator().manual_seed(5)
    h_s = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    w_t = torch.randn(6, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    mask = torch.tensor([[False, True, True, True], [True, True, False, True]])

    def fn(hs: Tensor, ws: Tensor) -> Tensor:
        return chunked_loss(name, hs, h_t, _linear_head(ws), _linear_head(w_t), mask,
                            labels=labels, chunk_tokens=2, **kw)

    assert torch.autograd.gradcheck(fn, (h_s, w_s))


@pytest.mark.parametrize("name,kw", [
    ("gjsd", {"beta": 0.5}), ("gjsd", {"beta": 0.9, "normalized": False}), ("forward_kl", {}),
    ("reverse_kl", {}), ("cakld", {"gamma": 0.2}), ("ntp", {}),
])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_equals_unchunked(name, kw, chunk):
    torch.manual_seed(6)
    hidden, vocab = 8, 17
    student_head = torch.nn.Linear(hidden, vocab)
    teacher_head = torch.nn.Linear(hidden, vocab).requires_grad_(False)
    h_t = torch.randn(3, 5, hidden)
    base = torch.randn(3, 5, hidden)
    labels = torch.randint(0, vocab, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, :2] = False  # e.g. prompt tokens
    mask[2, 4] = False  # padding

    h1 = base.clone().requires_grad_()
    ref = get_loss(name)(student_head(h1), teacher_head(h_t), mask, labels=labels, **kw)
    ref.backward()
    grads_ref = [h1.grad.clone(), student_head.weight.grad.clone(), student_head.bias.grad.clone()]
    student_head.zero_grad()

    h2 = base.clone().requires_grad_()
    got = chunked_loss(name, h2, h_t, student_head, teacher_head, mask, labels=labels,
                       chunk_tokens=chunk, **kw)
    got.backward()
    grads = [h2.grad, student_head.weight.grad, student_head.bias.grad]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert (h2.grad[~mask] == 0).all()
    with torch.no_grad():
        val = chunked_loss(name, base, h_t, student_head, teacher_head, mask, labels=labels,
                           chunk_tokens=chunk, **kw)
    torch.testing.assert_close(val, ref.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,kw", [("gjsd", {"beta": 0.1}), ("cakld", {"gamma": 0.6}), ("ntp", {})])
def test_gradcheck_chunked_frozen_head(name, kw):
    """A head without trainable parameters takes the fused path (gradient computed in the forward)."""
    g = torch.Generator().manual_seed(7)
    h_s = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w_s, w_t = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    h_t = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    mask = torch.tensor([[False, True, True, True], [True, True, False, True]])
    assert torch.autograd.gradcheck(
        lambda hs: chunked_loss(name, hs, h_t, _linear_head(w_s), _linear_head(w_t), mask, labels=labels,
                                chunk_tokens=2, **kw), (h_s,))


@pytest.mark.parametrize("head_trains", [True, False])
def test_frozen_head_runs_each_chunk_once(head_trains):
    """With a frozen head every chunk's logits are computed once (plus a one-row probe); with a
    trainable one the checkpointed chunks are recomputed in backward. Same hidden gradients."""
    torch.manual_seed(8)
    head = torch.nn.Linear(8, 17).requires_grad_(head_trains)
    calls = []
    counted = lambda h: calls.append(h.shape[0]) or head(h)  # noqa: E731
    teacher = torch.nn.Linear(8, 17).requires_grad_(False)
    base, h_t = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    h = base.clone().requires_grad_()
    chunked_loss("gjsd", h, h_t, counted, teacher, chunk_tokens=4, beta=0.5).backward()
    chunks = [4, 4, 4]
    assert calls == ([1] + chunks + chunks if head_trains else [1] + chunks)
    ref = base.clone().requires_grad_()
    get_loss("gjsd")(head(ref), teacher(h_t), beta=0.5).backward()
    torch.testing.assert_close(h.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_chunked_errors():
    h = torch.randn(1, 4, 3)
    head = torch.nn.Linear(3, 5)
    with pytest.raises(ValueError, match="needs teacher_hidden"):
        chunked_loss("forward_kl", h, None, head, None)
    with pytest.raises(ValueError, match="needs labels"):
        chunked_loss("ntp", h, None, head, None)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_loss("forward_kl", h, h, head, head, chunk_tokens=0)


# ---------------------------------------------------------------- the native row kernel


def _native_or_skip():
    from upq.kernels.native import load_native

    native = load_native()
    if native is None:
        pytest.skip("the native CPU kernel is unavailable here")
    return native


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("scale", [1.0, 8.0, 40.0])
def test_native_gjsd_rows_match_float64(beta, normalized, scale):
    """The one-pass C++ kernel against the float64 torch kernel: loss and gradient, from mild to
    saturated logits (where the top token has probability ~1), at an odd vocabulary size."""
    from upq.distill.losses import _gjsd_torch

    native = _native_or_skip()
    g = torch.Generator().manual_seed(int(scale))
    s = scale * torch.randn(9, 1003, generator=g)
    t = scale * torch.randn(9, 1003, generator=g)
    t[:, :3] += 3 * scale  # a peaky teacher
    want_loss, want_grad = _gjsd_torch(s.double(), t.double(), True, beta=beta, normalized=normalized)
    loss, grad = native.gjsd_rows(s, t, beta, normalized)
    torch.testing.assert_close(loss.double(), want_loss, rtol=5e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=2e-6 / min(beta, 1 - beta))


def test_native_gjsd_zero_probabilities():
    """-inf logits (zero probabilities) in one or both models: finite, and equal to the torch kernel."""
    from upq.distill.losses import _gjsd_torch

    native = _native_or_skip()
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    s[:, :3] = t[:, :3] = float("-inf")  # both
    s[:, 5] = float("-inf")  # student only
    t[:, 7] = float("-inf")  # teacher only
    for beta in (0.2, 0.8):
        loss, grad = native.gjsd_rows(s, t, beta, True)
        want_loss, want_grad = _gjsd_torch(s.double(), t.double(), True, beta=beta, normalized=True)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), want_loss, rtol=5e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=1e-5)
        assert (grad[:, :3] == 0).all() and (grad[:, 5] == 0).all()


def test_float32_gjsd_runs_the_native_kernel(monkeypatch):
    """The training path (float32 CPU logits, 0 < beta < 1) goes through the native kernel, and
    gives the loss the torch kernel gives."""
    import upq.distill.losses as losses

    native = _native_or_skip()
    calls = []

    class Counting:
        def gjsd_rows(self, *args):
            calls.append(args[2])
            return native.gjsd_rows(*args)

    monkeypatch.setattr(losses, "load_native", lambda: Counting())
    g = torch.Generator().manual_seed(0)
    s = torch.randn(12, 257, generator=g).requires_grad_()
    t = torch.randn(12, 257, generator=g)
    value = generalized_jsd(s, t, 0.3)
    value.backward()
    assert calls == [0.3]
    monkeypatch.setattr(losses, "load_native", lambda: None)
    s_ref = s.detach().clone().requires_grad_()
    reference = generalized_jsd(s_ref, t, 0.3)
    reference.backward()
    torch.testing.assert_close(value, reference, rtol=5e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=0, atol=1e-6)
