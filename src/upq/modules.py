"""QuantLinear (trainable fake-quant form), PackedLinear (storage form) and model-wide swapping."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .grids import GridSpec, QuantizedWeight, decode, make_quantizer
from .kernels import BACKENDS, NativeUnsupported, native_plan, packed_linear, run_plan
from .packing import pack_codes, packed_row_bytes, unpack_codes

DEFAULT_EXCLUDE = (r"(^|\.)lm_head$",)
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class QuantLinear(nn.Module):
    """A linear layer whose weight is fake-quantized on every forward.

    Holds the latent full-precision ``weight`` and the grid's parameters (``quantizer``); both are
    trainable. ``to_packed()`` turns it into the storage form. A quantizer with a ``linear``
    method (SEQ) runs the layer in one autograd node that keeps no quantized weight for backward;
    it is used when the input has the weight's dtype and no autocast is active.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: GridSpec, **options: bool) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.spec = spec
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.quantizer = make_quantizer(spec, self.weight, **options)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: GridSpec, **options: bool) -> "QuantLinear":
        """Wrap an ``nn.Linear``'s weight and bias (copied) into a fake-quant layer."""
        return cls(linear.weight, linear.bias, spec, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(self.quantizer, "linear", None)
        if fused is not None and x.dtype == self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return fused(x, self.weight, self.bias)
        weight = self.quantizer.fake_quant(self.weight)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def encode(self) -> QuantizedWeight:
        """Integer codes and parameters of the current latent weight."""
        return self.quantizer.encode(self.weight)

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses, as a detached float32 tensor."""
        return self.quantizer.fake_quant(self.weight.float()).detach()

    def to_packed(self, scale_dtype: torch.dtype = torch.float16) -> "PackedLinear":
        """Convert to the packed storage form."""
        return PackedLinear.from_quantized(self.encode(), self.bias, scale_dtype=scale_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, grid={self.spec.describe()}"


class PackedLinear(nn.Module):
    """A linear layer stored as packed low-bit codes plus per-group scales (and zero points).

    Buffers: ``qweight`` uint8 (out, packed_row_bytes), ``scale`` (out, groups[, 2]), optional
    ``zero`` uint8 (out, groups), optional ``bias``. The forward pass dequantizes and multiplies
    (the reference path); faster kernels plug in behind the same buffers: ``backend`` is
    ``"auto"`` (the native CPU kernel on CPU, the Triton kernel on CUDA, when it can run the
    input, else the reference path), ``"native"``/``"triton"`` (raise ``NativeUnsupported``/
    ``TritonUnsupported`` instead of falling back) or ``"reference"``.
    """

    backend: str = "auto"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: GridSpec,
        has_bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        groups = in_features // spec.group_len(in_features)
        self.register_buffer(
            "qweight", torch.zeros(out_features, packed_row_bytes(in_features, spec.bits), dtype=torch.uint8, device=device)
        )
        self.register_buffer("scale", torch.zeros(spec.impl.scale_shape(out_features, groups), dtype=scale_dtype, device=device))
        if spec.impl.has_zero:
            self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        else:
            self.zero = None
        if has_bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=scale_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_quantized(
        cls, q: QuantizedWeight, bias: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float16
    ) -> "PackedLinear":
        """Build from integer codes and parameters (``QuantizedWeight``)."""
        out_features, in_features = q.codes.shape
        layer = cls(in_features, out_features, q.spec, bias is not None, scale_dtype, device=q.codes.device)
        layer.qweight.copy_(pack_codes(q.codes, q.spec.bits))
        layer.scale.copy_(q.scale.to(scale_dtype))
        if q.zero is not None:
            layer.zero.copy_(q.zero)
        if bias is not None:
            layer.bias.copy_(bias.detach().to(scale_dtype))
        return layer

    def quantized(self) -> QuantizedWeight:
        """Unpacked codes and parameters."""
        codes = unpack_codes(self.qweight, self.spec.bits, self.in_features)
        return QuantizedWeight(self.spec, codes, self.scale, self.zero)

    def dequantize(self) -> torch.Tensor:
        """The full float32 weight (out, in); used by the reference path and by export."""
        return decode(self.quantized())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton" or (self.backend == "auto" and x.device.type != "cpu"):
            return packed_linear(x, self.qweight, self.scale, self.zero, self.bias, self.spec, self.in_features,
                                 backend=self.backend)
        if self.backend != "reference":
            reason = self._native_reason(x)
            if reason is None:
                return run_plan(self.__dict__["_native_plan"], x, self.qweight, self.scale, self.zero, self.bias)
            if self.backend == "native":
                raise NativeUnsupported(f"{self.extra_repr()}: {reason}")
        weight = self.dequantize().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def _native_reason(self, x: torch.Tensor) -> str | None:
        """Why the native kernel cannot run ``x`` through this layer (``None``: it can)."""
        plan = self.__dict__.get("_native_plan")
        if plan is None:  # the layer-level check is static: do it once (plan or the reason as a str)
            try:
                plan = native_plan(self.spec, self.in_features)
            except NativeUnsupported as exc:
                plan = str(exc)
            self.__dict__["_native_plan"] = plan
        if isinstance(plan, str):
            return plan
        if x.device.type != "cpu" or self.qweight.device.type != "cpu":
            return f"tensors are on {x.device}/{self.qweight.device}; the native kernel is CPU-only"
        if x.dtype not in _NATIVE_DTYPES:
            return f"input dtype {x.dtype} is not supported"
        if x.requires_grad and torch.is_grad_enabled():
            return "the native kernel has no backward pass"
        return None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, grid={self.spec.describe()}"


def set_backend(model: nn.Module, name: str) -> int:
    """Set the matmul backend (``auto`` | ``native`` | ``triton`` | ``reference``) of every ``PackedLinear``; returns how many."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    count = 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.backend = name
            count += 1
    return count


def select_linears(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    prefix: str = "",
) -> Iterator[tuple[str, nn.Linear]]:
    """Yield (name, module) of the ``nn.Linear`` layers chosen by regex patterns on module names.

    By default every linear except ``lm_head`` is chosen (embeddings and norms are never
    ``nn.Linear``). ``include``: a name must match one of these (``re.search``);
    ``exclude``: a name matching any of these is skipped. ``prefix`` is prepended to names
    before matching (for a submodule such as one decoder block of a larger model).
    """
    include_re = [re.compile(p) for p in (include or [r".*"])]
    exclude_re = [re.compile(p) for p in (DEFAULT_EXCLUDE if exclude is None else exclude)]
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        full = prefix + name
        if any(p.search(full) for p in include_re) and not any(p.search(full) for p in exclude_re):
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(
    model: nn.Module,
    spec: GridSpec,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    prefix: str = "",
    **options: bool,
) -> list[str]:
    """Replace the selected linears of ``model`` by ``QuantLinear`` in place; return their names."""
    chosen = list(select_linears(model, include, exclude, prefix))
    if not chosen:
        raise ValueError(
            "the model has no quantizable linear layers matching the selection "
            f"(include={list(include or ['.*'])}, exclude={list(DEFAULT_EXCLUDE if exclude is None else exclude)})"
        )
    for name, linear in chosen:
        try:
            _set_submodule(model, name, QuantLinear.from_linear(linear, spec, **options))
        except ValueError as exc:
            raise ValueError(f"cannot quantize {name} ({linear.in_features}->{linear.out_features}): {exc}") from exc
    return [name for name, _ in chosen]


def pack_model(model: nn.Module, scale_dtype: torch.dtype = torch.float16) -> list[str]:
    """Replace every ``QuantLinear`` in ``model`` by its ``PackedLinear``; return their names."""
    names = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).to_packed(scale_dtype))
    return names


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace quantized layers by plain ``nn.Linear`` holding the dequantized weights."""
    names = [name for name, m in model.named_modules() if isinstance(m, (QuantLinear, PackedLinear))]
    for name in names:
        layer = model.get_submodule(name)
        weight = layer.dequantized_weight() if isinstance(layer, QuantLinear) else layer.dequantize()
        target = dtype or (layer.weight.dtype if isinstance(layer, QuantLinear) else torch.float32)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device, dtype=target)
        linear.weight.copy_(weight.to(target))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.to(target))
        _set_submodule(model, name, linear)
    return names


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Names of all ``QuantLinear`` / ``PackedLinear`` layers in ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, (QuantLinear, PackedLinear))]
