"""Triton GPU kernel for packed low-bit linear layers (``x @ W^T + bias`` on CUDA).

Reads the ``PackedLinear`` storage form directly: each program owns a tile of output rows
(``BLOCK_N``) and of batch rows (``BLOCK_M``) and loops over the input features in ``BLOCK_K``
steps, loading the packed bytes of the tile, unpacking the 2-/4-bit codes with shifts and masks,
dequantizing them with the group's scale (and zero point, or the two R2Q magnitudes) in float32,
rounding the weights to the input dtype (as the reference path does) and accumulating in float32.
Batches of up to ``GEMV_MAX_M`` rows use a broadcast-multiply-reduce (GEMV) step, larger ones
``tl.dot`` (tensor cores; float32 inputs use IEEE precision, not TF32). Every dimension is
masked, so any M, N, K and group size that divides K works.

Importing this module imports Triton; with ``TRITON_INTERPRET=1`` set before that import the
kernel runs in Triton's CPU interpreter on CPU tensors (how the tests run it). The block sizes
are reasonable defaults, not tuned on a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..grids import GridSpec
from ..packing import storage_bits

GEMV_MAX_M = 4
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _packed_linear_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, group_len,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_sg, stride_zn, stride_om,
    GRID: tl.constexpr, BITS: tl.constexpr, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_PER_BLOCK: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M x BLOCK_N) output tile; the weight tile is built transposed, (BLOCK_K, BLOCK_N)."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    HALF: tl.constexpr = 1 << (BITS - 1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w_mask = mask_k[:, None] & mask_n[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        packed = tl.load(q_ptr + offs_n[None, :] * stride_qn + (offs_k // PER_BYTE)[:, None], mask=w_mask, other=0)
        code = (packed.to(tl.int32) >> ((offs_k % PER_BYTE) * WIDTH)[:, None]) & ((1 << WIDTH) - 1)
        if SCALE_PER_BLOCK:  # the whole K block lies in one group: one parameter per output row
            group = k0 // group_len
            p_mask = mask_n[None, :]
        else:  # groups change inside the block: gather the parameters per weight
            group = (offs_k // group_len)[:, None]
            p_mask = w_mask
        s_off = offs_n[None, :] * stride_sn + group * stride_sg
        scale = tl.load(s_ptr + s_off, mask=p_mask, other=0.0).to(tl.float32)
        if GRID == 0:  # seq: scale * (q - n + 0.5) / n
            w = ((code.to(tl.float32) - HALF + 0.5) / HALF) * scale
        elif GRID == 1:  # asym: (q - zero) * scale
            zero = tl.load(z_ptr + offs_n[None, :] * stride_zn + group, mask=p_mask, other=0)
            w = (code.to(tl.float32) - zero.to(tl.float32)) * scale
        else:  # r2q: a1 * (+-1) + a2 * (+-1), magnitudes stored side by side
            a2 = tl.load(s_ptr + s_off + 1, mask=p_mask, other=0.0).to(tl.float32)
            w = scale * ((code >> 1) * 2 - 1).to(tl.float32) + a2 * ((code & 1) * 2 - 1).to(tl.float32)
        w = w.to(x.dtype)  # padded K lanes need no masking here: their x is 0
        if DOT_F32:  # exact: bf16 values and their products are representable in float32
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif USE_DOT:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


INTERPRETED: bool = not isinstance(_packed_linear_kernel, triton.runtime.JITFunction)
"""True when Triton was imported with ``TRITON_INTERPRET=1``: the kernel then runs on CPU tensors."""


def unsupported_reason(spec: GridSpec, in_features: int, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why this kernel cannot run a layer/input (``None``: it can); Triton is already imported here."""
    if spec.impl.kernel_id is None:
        return f"grid {spec.grid!r} has no Triton kernel"
    if storage_bits(spec.bits) not in (2, 4):
        return f"{spec.bits}-bit codes are stored in {storage_bits(spec.bits)}-bit containers; the Triton kernel handles 2- and 4-bit storage"
    if dtype not in DTYPES:
        return f"input dtype {dtype} is not supported (float32, float16, bfloat16)"
    if device.type != "cuda" and not (INTERPRETED and device.type == "cpu"):
        return f"tensors are on {device}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1 for CPU tensors)"
    return None


class Blocks(NamedTuple):
    """Launch shape: tile sizes, whether each K step needs one scale per row, warps per program."""

    m: int
    n: int
    k: int
    scale_per_block: bool
    num_warps: int


def block_sizes(m: int, group_len: int, in_features: int, dtype: torch.dtype = torch.float16) -> Blocks:
    """Tile sizes for a batch of ``m`` rows: chosen so that every sm_90 build fits in 255 registers
    with at most 8 bytes of stack (checked by compiling ahead of time, no GPU); not tuned by timing.

    ``BLOCK_K`` is the largest of 64/32/16 (32/16 for float32 inputs, whose IEEE ``tl.dot`` runs on
    FMA units) that divides the group, so each K step reads one scale per output row; a group that
    none divides (e.g. 24) gathers the parameters per weight.
    """
    if m <= GEMV_MAX_M:
        block_m, block_n, warps = triton.next_power_of_2(max(m, 1)), 32, 4
    elif dtype == torch.float32:
        block_m, block_n, warps = 16, 64, 4
    else:
        block_m, block_n = (16, 64) if m <= 16 else (32, 64) if m <= 32 else (64, 64)
        warps = 8 if block_m >= 32 else 4
    candidates = (32, 16) if dtype == torch.float32 and block_m >= 16 else (64, 32, 16)
    for block_k in candidates:
        if group_len % block_k == 0:
            return Blocks(block_m, block_n, block_k, True, warps)
    # per-channel: one group spans all of K, so every K step still reads one scale per row
    return Blocks(block_m, block_n, candidates[0], group_len == in_features, warps)


def triton_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: GridSpec,
    in_features: int,
) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x`` of shape (..., in_features), output in ``x``'s dtype.

    Call :func:`unsupported_reason` first (``upq.kernels.packed_linear`` does); this only checks
    shapes.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {in_features}")
    out_features = qweight.shape[0]
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return out.view(*x.shape[:-1], out_features)
    qweight, scale = qweight.contiguous(), scale.contiguous()
    zero = None if zero is None else zero.contiguous()
    group_len = spec.group_len(in_features)
    blocks = block_sizes(m, group_len, in_features, x.dtype)
    grid = (triton.cdiv(out_features, blocks.n), triton.cdiv(m, blocks.m))
    _packed_linear_kernel[grid](
        x2, qweight, scale, qweight if zero is None else zero, qweight if bias is None else bias, out,
        m, out_features, in_features, group_len,
        x2.stride(0), x2.stride(1), qweight.stride(0), scale.stride(0), scale.stride(1),
        0 if zero is None else zero.stride(0), out.stride(0),
        GRID=spec.impl.kernel_id, BITS=spec.bits, WIDTH=storage_bits(spec.bits), HAS_BIAS=bias is not None,
        SCALE_PER_BLOCK=blocks.scale_per_block, USE_DOT=blocks.m >= 16,
        # the interpreter keeps bfloat16 as raw uint16 and its tl.dot multiplies those integers
        DOT_F32=blocks.m >= 16 and INTERPRETED and x.dtype == torch.bfloat16,
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, num_warps=blocks.num_warps,
    )
    return out.view(*x.shape[:-1], out_features)
