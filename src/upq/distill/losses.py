"""Token-level distillation losses between a teacher and a student language model.

Every loss takes logits of shape ``(..., V)`` and returns the **mean over valid token
positions** (or their sum with ``reduction="sum"``). A position is valid when ``mask`` is
true there (padding and, optionally, prompt tokens are excluded by the caller through the
mask). Masked positions are dropped *before* any computation, so they contribute exactly 0
to the value and to every gradient, whatever their logits contain.

Conventions
-----------
* ``P_T = softmax(teacher_logits)``, ``P_S = softmax(student_logits)``; the teacher is a
  constant: no gradient ever flows into teacher logits or the teacher head.
* Computation is in float32 (bf16/fp16 inputs are upcast); float64 inputs stay float64.
* ``0 * log 0 = 0``: vocabulary entries with probability exactly 0 (``-inf`` logits) give
  no NaN in values or gradients wherever the divergence is finite (gJSD always is; a KL whose
  second argument is 0 where the first is not is ``inf``).
* Gradients with respect to the student logits are analytic (closed forms below), computed in
  the forward pass and kept as a single ``(tokens, V)`` tensor; second derivatives are not
  supported.

Generalized JSD and its limits
------------------------------
With ``M = beta * P_T + (1 - beta) * P_S``::

    JSD_beta = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M)

This raw quantity is 0 at both ends (``M`` equals one of the two distributions). Expanding
around the ends (``d = log P_T - log P_S``)::

    beta -> 0:  beta * KL(P_T || M) = beta * KL(P_T || P_S) + O(beta^2)
                (1 - beta) * KL(P_S || M) = (beta^2 / 2) * chi2(P_T || P_S) + O(beta^3)
    beta -> 1:  symmetric, with alpha = 1 - beta:  alpha * KL(P_S || P_T) + O(alpha^2)
    hence JSD_beta / (beta (1 - beta)) = KL(P_T||P_S) + beta (KL(P_T||P_S) - chi2(P_T||P_S) / 2)
                                         + O(beta^2)

so ``JSD_beta / (beta * (1 - beta))`` is continuous on ``[0, 1]`` and equals forward
``KL(P_T || P_S)`` at ``beta = 0`` and reverse ``KL(P_S || P_T)`` at ``beta = 1``. This
*normalized* form is the default (``normalized=True``): it makes "beta -> 0 behaves like
forward KL, beta -> 1 like reverse KL" literally true, keeps the loss scale (and therefore the
useful learning rate) comparable across beta, and is exact at the end points (the exact KL
formulas are used there). ``normalized=False`` returns the raw ``JSD_beta`` (e.g. the symmetric
JSD ``<= log 2`` at ``beta = 0.5``); it is identically 0 at ``beta in {0, 1}``, so those values
are rejected in that mode.

The normalized loss is evaluated in a cancellation-free form, accurate in float32 for every
beta including ``beta = 1e-6`` (the naive formula loses everything there)::

    F = log(M / P_S) = log((1 - beta) + beta * exp(d)),   G = log(M / P_T) = F - d
    JSD_beta / (beta (1 - beta)) = - sum_v P_T * G / (1 - beta) - sum_v P_S * F / beta

where the one of F, G whose weight is small is computed directly with ``log1p`` (or with
``logaddexp`` where ``exp`` would overflow) and the other from it. The gradient with respect
to the student logits is ``P_S * (q - sum_v P_S q)`` with ``q = log(P_S / M) / beta = -F/beta``
(because ``d JSD_beta / d P_S = (1 - beta) log(P_S / M)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..kernels.native import load_native

__all__ = [
    "DistillLoss",
    "LOSSES",
    "cakld",
    "chunked_loss",
    "BoundLoss",
    "estimate_cakld_gamma",
    "forward_kl",
    "generalized_jsd",
    "get_loss",
    "next_token_ce",
    "reverse_kl",
]

Reduction = Literal["mean", "sum"]
Head = Callable[[Tensor], Tensor]

IGNORE_INDEX = -100
# Stand-in for log(0) in differences of log-probabilities: exp(-1e4) == 0 in float32 and
# float64, so the stand-in never changes a value, but it keeps every difference finite.
_LOG_ZERO = -1.0e4
# Beyond this exponent expm1 would overflow float32; such entries use the logaddexp branch.
_EXP_LIMIT = 80.0


# --------------------------------------------------------------------------------------------
# Per-token kernels on (N, V) logits in the compute dtype. Each returns (loss (N,), grad or
# None) where grad is d loss_n / d student_logits[n] with shape (N, V).
# --------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# The kernels below work on large (N, V) buffers and are written allocation-frugal (in-place
# updates, at most five live (N, V) float buffers): on CPU every fresh full-vocabulary buffer
# costs page faults, and on GPU it costs memory.


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a * b per row of (N, V) tensors without an (N, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])


def _forward_kl_kernel(s: Tensor, t: Tensor, need_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    log_s = torch.log_softmax(s, dim=-1)
    diff = torch.log_softmax(t, dim=-1)
    p_t = diff.exp()
    diff.sub_(log_s).masked_fill_(p_t == 0, 0.0)  # log P_T - log P_S, 0 where P_T = 0
    loss = _row_dot(p_t, diff)
    del diff
    grad = log_s.exp_().sub_(p_t) if need_grad else None  # softmax(s) - P_T
    return loss, grad


def _reverse_kl_kernel(s: Tensor, t: Tensor, need_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    log_s = torch.log_softmax(s, dim=-1)
    r = torch.log_softmax(t, dim=-1)
    p_s = log_s.exp()
    r.neg_().add_(log_s).masked_fill_(p_s == 0, 0.0)  # log P_S - log P_T, 0 where P_S = 0
    del log_s
    loss = _row_dot(p_s, r)
    grad = r.sub_(loss.unsqueeze(-1)).mul_(p_s) if need_grad else None  # P_S (r - KL)
    return loss, grad


def _log_mix(x: Tensor, w: float, sign: float) -> Tensor:
    """New tensor log((1 - w) + w * exp(sign * x)) for 0 < w < 1 and finite x, accurate
    also when the result is tiny (log1p branch) or exp would overflow (logaddexp branch)."""
    out = torch.mul(x, sign).clamp_(max=_EXP_LIMIT).expm1_().mul_(w)  # w (e^x - 1)
    use_log1p = (out > -0.5) & (out < 0.5)
    use_log1p &= (x <= _EXP_LIMIT) if sign > 0 else (x >= -_EXP_LIMIT)
    out.log1p_()
    lse = torch.mul(x, sign).add_(math.log(w))
    torch.logaddexp(lse, torch.tensor(math.log1p(-w), dtype=x.dtype), out=lse)
    return torch.where(use_log1p, out, lse, out=out)


def _native_rows(s: Tensor, t: Tensor) -> Any:
    """The native kernel module when it can run these (N, V) logits (float32 on CPU), else None."""
    if s.device.type != "cpu" or s.dtype != torch.float32 or t.dtype != torch.float32 or s.dim() != 2:
        return None
    return load_native()


def _gjsd_kernel(
    s: Tensor, t: Tensor, need_grad: bool, *, beta: float, normalized: bool
) -> tuple[Tensor, Optional[Tensor]]:
    """gJSD per row and its gradient: the native one-pass row kernel for float32 CPU logits with
    0 < beta < 1 (``gjsd_loss.cpp``), else :func:`_gjsd_torch`."""
    native = _native_rows(s, t) if 0.0 < beta < 1.0 else None
    if native is None:
        return _gjsd_torch(s, t, need_grad, beta=beta, normalized=normalized)
    loss, grad = native.gjsd_rows(s, t, beta, normalized)
    return loss, grad if need_grad else None


def _gjsd_torch(
    s: Tensor, t: Tensor, need_grad: bool, *, beta: float, normalized: bool
) -> tuple[Tensor, Optional[Tensor]]:
    if beta == 0.0:
        loss, grad = _forward_kl_kernel(s, t, need_grad)
    elif beta == 1.0:
        loss, grad = _reverse_kl_kernel(s, t, need_grad)
    else:
        d = torch.log_softmax(s, dim=-1)
        p_t = torch.log_softmax(t, dim=-1)
        p_s = d.exp()
        d.masked_fill_(torch.isneginf(d), _LOG_ZERO)
        p_t.masked_fill_(torch.isneginf(p_t), _LOG_ZERO)
        d.neg_().add_(p_t)  # d = log P_T - log P_S (finite)
        p_t.exp_()
        # F = log(M / P_S), G = log(M / P_T) = F - d; compute the one whose weight is small
        # directly (it may be tiny and is divided by that weight), the other from it.
        if beta <= 0.5:
            f = _log_mix(d, beta, 1.0)
            g = d.neg_().add_(f)
        else:
            g = _log_mix(d, 1.0 - beta, -1.0)
            f = d.add_(g)
        t_term = g.mul_(p_t).sum(-1)  # sum P_T G
        del g, d
        s_term = torch.mul(p_s, f, out=p_t).sum(-1)  # sum P_S F
        del p_t
        loss = t_term.div_(-(1.0 - beta)).sub_(s_term, alpha=1.0 / beta)
        grad = None
        if need_grad:
            # d loss / dP_S = log(P_S / M) / beta = -F / beta; through the softmax:
            grad = f.neg_().add_(s_term.unsqueeze(-1)).mul_(p_s).div_(beta)
    if not normalized:
        scale = beta * (1.0 - beta)
        loss = loss * scale
        if grad is not None:
            grad.mul_(scale)
    return loss, grad


def _cakld_kernel(
    s: Tensor, t: Tensor, need_grad: bool, *, gamma: float
) -> tuple[Tensor, Optional[Tensor]]:
    log_s = torch.log_softmax(s, dim=-1)
    p_t = torch.log_softmax(t, dim=-1)
    p_s = log_s.exp()
    log_s.sub_(p_t)  # D = log P_S - log P_T
    p_t.exp_()
    fwd_terms = log_s.masked_fill(p_t == 0, 0.0).mul_(p_t)
    fwd = fwd_terms.sum(-1).neg_()  # KL(P_T || P_S)
    r = torch.where(p_s > 0, log_s, log_s.new_zeros(()), out=fwd_terms)
    del log_s
    rev = _row_dot(p_s, r)  # KL(P_S || P_T)
    loss = rev * gamma + fwd * (1.0 - gamma)
    grad = None
    if need_grad:
        grad = r.sub_(rev.unsqueeze(-1)).mul_(p_s).mul_(gamma)
        grad.add_(p_s, alpha=1.0 - gamma).sub_(p_t, alpha=1.0 - gamma)
    return loss, grad


def _ntp_kernel(s: Tensor, labels: Tensor, need_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    log_s = torch.log_softmax(s, dim=-1)
    idx = labels.unsqueeze(-1)
    loss = log_s.gather(-1, idx).squeeze(-1).neg_()
    grad = None
    if need_grad:
        grad = log_s.exp_()
        minus_one = torch.full(idx.shape, -1.0, dtype=grad.dtype, device=grad.device)
        grad.scatter_add_(-1, idx, minus_one)  # softmax(s) - one_hot(label)
    return loss, grad


class _TokenLoss(torch.autograd.Function):
    """Per-token loss of (N, V) student logits with an analytic, precomputed gradient."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, kernel: Callable[..., Any], *args: Any) -> Tensor:
        s = student.to(_compute_dtype(student))
        with torch.autocast(s.device.type, enabled=False):  # keep reductions in full precision
            loss, grad = kernel(s, *args, need_grad=True)
        ctx.save_for_backward(grad.to(student.dtype))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:
        (grad,) = ctx.saved_tensors
        n_extra = len(ctx.needs_input_grad) - 1
        return (grad * grad_out.unsqueeze(-1).to(grad.dtype), *([None] * n_extra))


def _per_token(
    kernel: Callable[..., tuple[Tensor, Optional[Tensor]]],
    student: Tensor,
    other: Tensor,
    **kw: Any,
) -> Tensor:
    """Apply a kernel to (N, V) student logits; differentiable w.r.t. the student only."""
    if torch.is_grad_enabled() and student.requires_grad:
        fn = lambda s, o, need_grad: kernel(s, o, need_grad, **kw)  # noqa: E731
        return _TokenLoss.apply(student, fn, other)
    with torch.no_grad(), torch.autocast(student.device.type, enabled=False):
        loss, _ = kernel(student.to(_compute_dtype(student)), other, False, **kw)
    return loss


# --------------------------------------------------------------------------------------------
# Loss registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillLoss:
    """A registered loss: a per-token function plus what it needs.

    ``per_token(student_logits (N, V), teacher_logits (N, V) | None, labels (N,) | None, **kw)``
    returns the per-token losses (N,). Calling the object evaluates the loss on materialised
    logits with the uniform signature ``(student_logits, teacher_logits=None, mask=None, *,
    labels=None, reduction="mean", **kw)``; :func:`chunked_loss` evaluates it from hidden
    states.
    """

    name: str
    per_token: Callable[..., Tensor]
    needs_teacher: bool
    needs_labels: bool
    doc: str

    def __call__(
        self,
        student_logits: Tensor,
        teacher_logits: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        *,
        labels: Optional[Tensor] = None,
        reduction: Reduction = "mean",
        **kw: Any,
    ) -> Tensor:
        return _reduce_logits(self, student_logits, teacher_logits, mask, labels, reduction, kw)


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _teacher_compute(t: Tensor, student: Tensor) -> Tensor:
    """Teacher logits as a constant in the student's compute dtype."""
    return t.detach().to(_compute_dtype(student))


def _gjsd_per_token(
    s: Tensor,
    t: Optional[Tensor],
    labels: Optional[Tensor] = None,
    *,
    beta: float,
    normalized: bool = True,
) -> Tensor:
    beta = _check_unit("beta", beta)
    if not normalized and beta in (0.0, 1.0):
        raise ValueError(
            "the unnormalized generalized JSD is identically 0 at beta=0 and beta=1; "
            "use normalized=True (whose end points are forward / reverse KL) or "
            "forward_kl / reverse_kl directly"
        )
    assert t is not None
    tc = _teacher_compute(t, s)
    return _per_token(_gjsd_kernel, s, tc, beta=beta, normalized=normalized)


def _forward_kl_per_token(
    s: Tensor, t: Optional[Tensor], labels: Optional[Tensor] = None
) -> Tensor:
    assert t is not None
    return _per_token(_forward_kl_kernel, s, _teacher_compute(t, s))


def _reverse_kl_per_token(
    s: Tensor, t: Optional[Tensor], labels: Optional[Tensor] = None
) -> Tensor:
    assert t is not None
    return _per_token(_reverse_kl_kernel, s, _teacher_compute(t, s))


def _cakld_per_token(
    s: Tensor, t: Optional[Tensor], labels: Optional[Tensor] = None, *, gamma: float
) -> Tensor:
    gamma = _check_unit("gamma", gamma)
    assert t is not None
    return _per_token(_cakld_kernel, s, _teacher_compute(t, s), gamma=gamma)


def _ntp_per_token(s: Tensor, t: Optional[Tensor], labels: Optional[Tensor] = None) -> Tensor:
    if labels is None:
        raise ValueError("next-token cross-entropy needs labels")
    vocab = s.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
        raise ValueError(f"labels must be in [0, {vocab}) at valid positions (or {IGNORE_INDEX})")
    return _per_token(_ntp_kernel, s, labels.long())


LOSSES: dict[str, DistillLoss] = {
    "gjsd": DistillLoss(
        "gjsd", _gjsd_per_token, True, False,
        "generalized JSD_beta(P_T||P_S) (kw: beta, normalized=True)",
    ),
    "forward_kl": DistillLoss("forward_kl", _forward_kl_per_token, True, False, "KL(P_T||P_S)"),
    "reverse_kl": DistillLoss("reverse_kl", _reverse_kl_per_token, True, False, "KL(P_S||P_T)"),
    "cakld": DistillLoss(
        "cakld", _cakld_per_token, True, False,
        "gamma*KL(P_S||P_T) + (1-gamma)*KL(P_T||P_S) (kw: gamma)",
    ),
    "ntp": DistillLoss("ntp", _ntp_per_token, False, True, "next-token cross-entropy (labels)"),
}


@dataclass(frozen=True)
class BoundLoss:
    """A registered loss with its parameters fixed once (``beta`` for gJSD, ``gamma`` for CAKLD)."""

    loss: DistillLoss
    beta: float | None = None
    gamma: float | None = None

    @property
    def name(self) -> str:
        return self.loss.name

    @property
    def needs_teacher(self) -> bool:
        return self.loss.needs_teacher

    @property
    def needs_labels(self) -> bool:
        return self.loss.needs_labels

    def chunked(self, student_hidden: Tensor, teacher_hidden: Optional[Tensor], student_head: Head,
                teacher_head: Optional[Head], mask: Optional[Tensor] = None, *, labels: Optional[Tensor] = None,
                chunk_tokens: int = 1024, reduction: Reduction = "mean") -> Tensor:
        """:func:`chunked_loss` of this loss with its bound parameters."""
        params = {k: v for k, v in (("beta", self.beta), ("gamma", self.gamma)) if v is not None}
        return chunked_loss(self.loss, student_hidden, teacher_hidden, student_head, teacher_head, mask, labels=labels,
                            chunk_tokens=chunk_tokens, reduction=reduction, **params)


def get_loss(name: str | DistillLoss) -> DistillLoss:
    """Look up a registered loss by name (a :class:`DistillLoss` is returned unchanged)."""
    if isinstance(name, DistillLoss):
        return name
    try:
        return LOSSES[name]
    except KeyError:
        valid = ", ".join(sorted(LOSSES))
        raise ValueError(f"unknown distillation loss {name!r}; valid names: {valid}") from None


# --------------------------------------------------------------------------------------------
# Masking and reduction
# --------------------------------------------------------------------------------------------


def _valid_positions(
    lead_shape: torch.Size,
    mask: Optional[Tensor],
    labels: Optional[Tensor],
    device: torch.device,
) -> Optional[Tensor]:
    """Flat indices of valid positions, or None when every position is valid."""
    valid: Optional[Tensor] = None
    if mask is not None:
        if tuple(mask.shape) != tuple(lead_shape):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match the token shape {tuple(lead_shape)}"
            )
        valid = mask.to(device=device).bool()
    if labels is not None:
        if tuple(labels.shape) != tuple(lead_shape):
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match the token shape "
                f"{tuple(lead_shape)}"
            )
        not_ignored = labels.to(device) != IGNORE_INDEX
        valid = not_ignored if valid is None else valid & not_ignored
    if valid is None:
        return None
    return valid.reshape(-1).nonzero().squeeze(-1)


def _finish(total: Tensor, count: int, reduction: Reduction) -> Tensor:
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(count, 1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _reduce_logits(
    spec: DistillLoss,
    student_logits: Tensor,
    teacher_logits: Optional[Tensor],
    mask: Optional[Tensor],
    labels: Optional[Tensor],
    reduction: Reduction,
    kw: dict[str, Any],
) -> Tensor:
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have shape (..., V)")
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if spec.needs_teacher:
        if teacher_logits is None:
            raise ValueError(f"loss {spec.name!r} needs teacher_logits")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
                f"{tuple(student_logits.shape)}"
            )
    if spec.needs_labels and labels is None:
        raise ValueError(f"loss {spec.name!r} needs labels")
    idx = _valid_positions(lead, mask, labels if spec.needs_labels else None, student_logits.device)
    s = student_logits.reshape(-1, vocab)
    t = None
    if spec.needs_teacher and teacher_logits is not None:
        t = teacher_logits.reshape(-1, vocab)
    lab = labels.reshape(-1).to(s.device) if spec.needs_labels and labels is not None else None
    if idx is not None:
        s = s.index_select(0, idx)
        t = t.index_select(0, idx) if t is not None else None
        lab = lab.index_select(0, idx) if lab is not None else None
    total = spec.per_token(s, t, lab, **kw).sum()
    return _finish(total, s.shape[0], reduction)


# --------------------------------------------------------------------------------------------
# Public functional forms on materialised logits
# --------------------------------------------------------------------------------------------


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float,
    mask: Optional[Tensor] = None,
    *,
    normalized: bool = True,
    reduction: Reduction = "mean",
) -> Tensor:
    """Generalized Jensen-Shannon divergence JSD_beta(P_T || P_S), averaged over valid tokens.

    ``JSD_beta = beta KL(P_T||M) + (1-beta) KL(P_S||M)``, ``M = beta P_T + (1-beta) P_S``.
    With ``normalized=True`` (default) the value is divided by ``beta (1 - beta)``: continuous
    on [0, 1], equal to forward ``KL(P_T||P_S)`` at ``beta=0`` and reverse ``KL(P_S||P_T)`` at
    ``beta=1`` (see the module docstring for the derivation). With ``normalized=False`` the raw
    divergence is returned (``<= log 2`` at ``beta=0.5``); ``beta`` must then be in (0, 1).
    """
    return LOSSES["gjsd"](
        student_logits, teacher_logits, mask, reduction=reduction, beta=beta, normalized=normalized
    )


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Forward KL(P_T || P_S) (mode covering), averaged over valid tokens."""
    return LOSSES["forward_kl"](student_logits, teacher_logits, mask, reduction=reduction)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Reverse KL(P_S || P_T) (mode seeking), averaged over valid tokens."""
    return LOSSES["reverse_kl"](student_logits, teacher_logits, mask, reduction=reduction)


def cakld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    gamma: float,
    mask: Optional[Tensor] = None,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Confidence-aware KLD (BitDistiller): gamma KL(P_S||P_T) + (1-gamma) KL(P_T||P_S)."""
    return LOSSES["cakld"](student_logits, teacher_logits, mask, reduction=reduction, gamma=gamma)


def next_token_ce(
    student_logits: Tensor,
    labels: Tensor,
    mask: Optional[Tensor] = None,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Cross-entropy of ``labels`` under the student, averaged over valid tokens.

    ``student_logits[..., i, :]`` is scored against ``labels[..., i]``: logits and target ids
    must already be aligned (shifting ``logits[:, :-1]`` against ``ids[:, 1:]`` is the
    caller's job). Positions with ``labels == -100`` are ignored, like masked ones.
    """
    return LOSSES["ntp"](student_logits, None, mask, labels=labels, reduction=reduction)


@torch.no_grad()
def estimate_cakld_gamma(
    teacher_logits_batches: Iterable[Tensor],
    masks: Optional[Iterable[Optional[Tensor]]] = None,
) -> float:
    """CAKLD's gamma: the teacher's mean top-1 probability over all valid tokens.

    Tokens are pooled across batches (a batch with more valid tokens weighs more). ``masks``,
    if given, must yield one mask (or None) per logits batch.
    """
    batches = list(teacher_logits_batches)
    mask_list = list(masks) if masks is not None else [None] * len(batches)
    if len(mask_list) != len(batches):
        raise ValueError(f"got {len(batches)} logits batches but {len(mask_list)} masks")
    total = 0.0
    count = 0
    for logits, mask in zip(batches, mask_list):
        vocab = logits.shape[-1]
        idx = _valid_positions(logits.shape[:-1], mask, None, logits.device)
        flat = logits.reshape(-1, vocab)
        if idx is not None:
            flat = flat.index_select(0, idx)
        if flat.shape[0] == 0:
            continue
        top1 = torch.softmax(flat.to(_compute_dtype(flat)), dim=-1).amax(dim=-1)
        total += float(top1.double().sum())
        count += flat.shape[0]
    if count == 0:
        raise ValueError("estimate_cakld_gamma: no valid tokens")
    return total / count


# --------------------------------------------------------------------------------------------
# Chunked computation from final hidden states
# --------------------------------------------------------------------------------------------


def _head_trains(head: Head, hidden: Tensor) -> bool:
    """Whether ``head`` has parameters that take gradients (probed on one row)."""
    with torch.enable_grad():
        return head(hidden[:1].detach()).requires_grad


class _HeadLossChunk(torch.autograd.Function):
    """One chunk's summed loss, with its gradient w.r.t. the chunk's hidden states computed in the
    forward pass (head, loss kernel, then the head's backward, while the chunk's logits exist) and
    kept as an (n, H) tensor: the logits are computed once instead of again in a recomputing
    backward. Only for heads without trainable parameters."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, chunk_sum: Callable[[Tensor], Tensor]) -> Tensor:
        with torch.enable_grad():
            x = hidden.detach().requires_grad_(True)
            total = chunk_sum(x)
            (grad,) = torch.autograd.grad(total, x)
        ctx.save_for_backward(grad)
        return total.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None


def chunked_loss(
    loss: str | DistillLoss,
    student_hidden: Tensor,
    teacher_hidden: Optional[Tensor],
    student_head: Head,
    teacher_head: Optional[Head],
    mask: Optional[Tensor] = None,
    *,
    labels: Optional[Tensor] = None,
    chunk_tokens: int = 1024,
    reduction: Reduction = "mean",
    **kw: Any,
) -> Tensor:
    """A registered loss computed from final hidden states, ``chunk_tokens`` tokens at a time.

    ``student_hidden`` / ``teacher_hidden`` have shape ``(..., H)`` (the final-norm outputs);
    ``student_head`` / ``teacher_head`` map ``(n, H) -> (n, V)`` (typically the models'
    ``lm_head`` modules). Only valid positions are projected; each chunk's logits exist only
    inside a ``torch.utils.checkpoint`` region, so full-vocabulary memory is bounded by
    ``chunk_tokens x V`` whatever the sequence length (at the price of recomputing each chunk's
    head projections during backward). Gradients reach ``student_hidden`` and any parameters
    of ``student_head``; the teacher side runs under ``no_grad``. The result equals the
    unchunked loss on ``head(hidden)`` logits up to float rounding (sum, then one division by
    the number of valid tokens). ``kw`` goes to the loss (``beta``, ``normalized``, ``gamma``).
    Measured (float32, H=576, V=49152, bench/loss_memory.py): about 1.5 GiB peak above the
    inputs with ``chunk_tokens=1024`` and 0.7 GiB with 256, flat in sequence length.

    When the student head has no trainable parameters (the usual case: upq trains the decoder
    linears, not the head), each chunk's gradient w.r.t. its hidden states is computed right away
    (:class:`_HeadLossChunk`) instead of recomputing the chunk during backward: the same
    gradients, with the head projections and the loss kernel run once instead of twice.
    """
    spec = get_loss(loss)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    hidden = student_hidden.shape[-1]
    lead = student_hidden.shape[:-1]
    if spec.needs_teacher:
        if teacher_hidden is None or teacher_head is None:
            raise ValueError(f"loss {spec.name!r} needs teacher_hidden and teacher_head")
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(
                f"teacher_hidden token shape {tuple(teacher_hidden.shape[:-1])} != student "
                f"token shape {tuple(lead)}"
            )
    if spec.needs_labels and labels is None:
        raise ValueError(f"loss {spec.name!r} needs labels")

    idx = _valid_positions(lead, mask, labels if spec.needs_labels else None, student_hidden.device)
    s_h = student_hidden.reshape(-1, hidden)
    t_h: Optional[Tensor] = None
    if spec.needs_teacher:
        assert teacher_hidden is not None
        t_h = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    lab = labels.reshape(-1).to(s_h.device) if spec.needs_labels and labels is not None else None
    if idx is not None:
        s_h = s_h.index_select(0, idx)
        t_h = t_h.index_select(0, idx) if t_h is not None else None
        lab = lab.index_select(0, idx) if lab is not None else None
    n_valid = s_h.shape[0]

    def chunk_sum(s_c: Tensor, t_c: Optional[Tensor], lab_c: Optional[Tensor]) -> Tensor:
        s_logits = student_head(s_c)
        t_logits = None
        if t_c is not None:
            assert teacher_head is not None
            with torch.no_grad():
                t_logits = teacher_head(t_c)
        return spec.per_token(s_logits, t_logits, lab_c, **kw).sum()

    training = torch.is_grad_enabled() and s_h.requires_grad
    fused = training and n_valid > 0 and not _head_trains(student_head, s_h)
    total: Optional[Tensor] = None
    for start in range(0, n_valid, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        args = (s_h[sl], t_h[sl] if t_h is not None else None, lab[sl] if lab is not None else None)
        if fused:
            part = _HeadLossChunk.apply(args[0], lambda x, t=args[1], y=args[2]: chunk_sum(x, t, y))
        elif training:
            part = checkpoint(chunk_sum, *args, use_reentrant=False)
        else:
            part = chunk_sum(*args)
        total = part if total is None else total + part
    if total is None:  # no valid token: a zero that still belongs to the graph
        total = s_h.sum() * 0.0
    return _finish(total, n_valid, reduction)
