"""Training-memory savers: recomputation modes and frozen tensors shared with the teacher."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from upq.distill.config import DistillConfig
from upq.distill.memory import check_checkpointing, enable_checkpointing, share_frozen_tensors


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def test_frozen_tensors_equal_to_the_teachers_share_its_storage() -> None:
    teacher = _tiny_llama().requires_grad_(False)
    student = copy.deepcopy(teacher)
    for name, p in student.named_parameters():
        p.requires_grad_("embed" not in name)  # only the (tied) embedding is frozen
    with torch.no_grad():
        student.model.norm.weight.add_(1.0)  # a frozen-if-it-were tensor that differs stays apart
    saved = share_frozen_tensors(student, teacher)
    emb = student.model.embed_tokens.weight
    assert saved == emb.numel() * 4
    assert emb.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()
    assert student.lm_head.weight is emb  # still tied
    assert student.model.layers[0].mlp.up_proj.weight.data_ptr() != teacher.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert share_frozen_tensors(student, teacher) == 0  # already shared


def test_unequal_frozen_tensors_are_not_shared() -> None:
    teacher = _tiny_llama().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(False)
    with torch.no_grad():
        student.model.embed_tokens.weight[0, 0] += 1e-3
    share_frozen_tensors(student, teacher)
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    assert student.model.norm.weight.data_ptr() == teacher.model.norm.weight.data_ptr()


def test_mlp_recomputation_gives_identical_gradients() -> None:
    grads = {}
    for mode in ("none", "mlp"):
        model = _tiny_llama()
        enable_checkpointing(model, mode)
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids).logits.square().mean().backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.equal(grads["none"][n], grads["mlp"][n]) for n in grads["none"])


def test_mlp_recomputation_keeps_fewer_tensors_for_backward() -> None:
    def saved_bytes(mode: str) -> int:
        model = _tiny_llama()
        enable_checkpointing(model, mode)
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        ids = torch.zeros(2, 12, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids)
        return total[0]

    assert saved_bytes("mlp") < saved_bytes("none")


def test_recomputation_mode_is_checked() -> None:
    assert check_checkpointing(True) == "layers" and check_checkpointing(False) == "none"
    with pytest.raises(ValueError, match="gradient_checkpointing must be one of"):
        DistillConfig(student_init="direct", steps=1, gradient_checkpointing="attention")
    with pytest.raises(ValueError, match="needs decoder layers with an `mlp` module"):
        enable_checkpointing(_NoMLP(), "mlp")


class _NoMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    def get_decoder(self) -> torch.nn.Module:
        return self
