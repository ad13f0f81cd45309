"""Sibling fusion (q/k/v, gate/up as one packed matmul) keeps the model's outputs."""

from __future__ import annotations

import torch

from upq.fusion import fuse_siblings, unfuse_siblings
from upq.grids import GridSpec
from upq.modules import PackedLinear, pack_model, quantize_model, set_backend


def test_fused_model_matches_and_unfuses(tiny_model) -> None:
    model, tokenizer = tiny_model
    quantize_model(model, GridSpec("asym", 2, 32))
    pack_model(model)
    ids = torch.tensor([tokenizer("The quick brown fox jumps")["input_ids"]])
    keys = sorted(model.state_dict())
    with torch.no_grad():
        ref = model(ids).logits
        assert fuse_siblings(model) == 4  # 2 layers x (qkv, gate/up)
        assert fuse_siblings(model) == 0  # idempotent
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        set_backend(model, "reference")
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        # a sibling called on its own (different input) still computes its own output
        k = model.model.layers[0].self_attn.k_proj
        x = torch.randn(3, k.in_features)
        torch.testing.assert_close(k(x), torch.nn.functional.linear(x, k.dequantize()), rtol=1e-5, atol=1e-5)
        assert sorted(model.state_dict()) == keys
        assert unfuse_siblings(model) == 10
        set_backend(model, "auto")
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert all("_upq_fusion" not in m.__dict__ for m in model.modules() if isinstance(m, PackedLinear))


def test_incompatible_groups_are_left_alone(tiny_model) -> None:
    model, _ = tiny_model
    quantize_model(model, GridSpec("seq", 2, None), include=[r"q_proj", r"gate_proj"])
    pack_model(model)
    assert fuse_siblings(model) == 0  # k/v and up are plain nn.Linear
