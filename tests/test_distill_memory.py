"""Training-memory savers: recomputation modes, frozen tensors shared with the teacher, the CPU block cache."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from upq.distill import memory
from upq.distill.config import DistillConfig
from upq.distill.memory import check_checkpointing, cpu_block_cache, enable_checkpointing, share_frozen_tensors
from upq.kernels.native import load_native


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


def _saved_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors a forward of ``model`` keeps for backward."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.zeros(2, 12, dtype=torch.long))
    return total[0]


def test_mlp_recomputation_keeps_fewer_tensors_for_backward() -> None:
    kept = {}
    for mode in ("none", "mlp"):
        kept[mode] = _tiny_llama()
        enable_checkpointing(kept[mode], mode)
    mlp_only = _tiny_llama()  # the MLPs recomputed, the post-attention norms not
    for layer in mlp_only.model.layers:
        layer.mlp.forward = memory._recomputed(type(layer.mlp).forward.__get__(layer.mlp))
    hidden_bytes = 2 * 12 * 16 * 4
    assert _saved_bytes(kept["mlp"]) < _saved_bytes(mlp_only) < _saved_bytes(kept["none"])
    # each of the 2 layers keeps the norm's output no more (the MLP's input is the norm's input)
    assert _saved_bytes(kept["mlp"]) <= _saved_bytes(mlp_only) - 2 * hidden_bytes


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


MIB = 1 << 20


def _native_or_skip():
    native = load_native()
    if native is None:
        pytest.skip("the native extension is unavailable")
    return native


def test_block_cache_reuses_freed_blocks_and_restores_the_allocator() -> None:
    native = _native_or_skip()
    with cpu_block_cache(8) as stats:
        assert stats is not None and stats()["installed"]
        start = stats()
        first = torch.ones(MIB // 2)  # 2 MiB
        torch.ones(16)  # below the 1 MiB floor: not the cache's
        assert stats()["misses"] == start["misses"] + 1
        assert stats()["mapped_bytes"] == start["mapped_bytes"] + 2 * MIB
        ptr = first.data_ptr()
        del first
        assert stats()["cached_bytes"] == 2 * MIB
        again = torch.empty(MIB // 2)
        assert again.data_ptr() == ptr and stats()["hits"] == start["hits"] + 1 and stats()["cached_bytes"] == 0
        big = torch.zeros(3 * MIB)  # 12 MiB, over the 8 MiB limit: unmapped as soon as it is freed
        mapped = stats()["mapped_bytes"]
        del big
        assert stats()["mapped_bytes"] == mapped - 12 * MIB and stats()["cached_bytes"] == 0
        with cpu_block_cache(8) as inner:
            assert inner is None  # the outer block owns the cache
        assert stats()["installed"]
        kept = torch.full((MIB // 2,), 3.0)
    after = native.block_cache_stats()
    assert not after["installed"] and after["cached_bytes"] == 0
    assert float(kept.sum()) == 3.0 * (MIB // 2)  # blocks outlive the cache block
    del kept, again
    assert native.block_cache_stats()["mapped_bytes"] == after["mapped_bytes"] - 4 * MIB
    torch.ones(MIB // 2)
    assert native.block_cache_stats()["misses"] == after["misses"]  # the default allocator serves again


def test_block_cache_evicts_the_oldest_block_and_reuses_the_newest() -> None:
    _native_or_skip()
    with cpu_block_cache(4) as stats:
        blocks = [torch.empty(MIB // 2) for _ in range(3)]
        ptrs = [b.data_ptr() for b in blocks]
        mapped = stats()["mapped_bytes"]
        while blocks:  # freed in order: the third no longer fits in 4 MiB, so the first goes
            del blocks[0]
        assert stats()["cached_bytes"] == 4 * MIB and stats()["mapped_bytes"] == mapped - 2 * MIB
        reused = [torch.empty(MIB // 2) for _ in range(3)]
        assert [r.data_ptr() for r in reused[:2]] == [ptrs[2], ptrs[1]]
        assert reused[2].data_ptr() not in ptrs[1:]


def test_block_cache_off_and_limits_are_checked() -> None:
    with cpu_block_cache(0) as stats:
        assert stats is None
    with pytest.raises(ValueError, match="block_cache_mib must be >= 0"):
        DistillConfig(student_init="direct", steps=1, block_cache_mib=-1)
    plain = DistillConfig(student_init="direct", steps=1)
    assert DistillConfig(student_init="direct", steps=1, block_cache_mib=0).fingerprint(1) == plain.fingerprint(1)
