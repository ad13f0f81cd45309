"""Student initialisation: progressive INT4 -> INT2 nesting, direct init, what trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill_helpers import one_thread, write_int4  # noqa: F401 (fixture)
from upq.checkpoint import load
from upq.distill.student import build_student, direct_student, progressive_student
from upq.trainable import trainable_groups
from upq.grids import GridSpec
from upq.grids.seq import EPS
from upq.modules import PackedLinear, QuantLinear


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def int4_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    return write_int4(tiny_model_dir, tmp_path_factory.mktemp("int4") / "ckpt")


@pytest.mark.parametrize("delta_init", ["max", "int4"])
def test_progressive_nests_int4_levels_into_int2(int4_dir: Path, delta_init: str) -> None:
    int4 = load(int4_dir)
    student = progressive_student(int4_dir, GridSpec("seq", 2, None), delta_init)
    layers = {n: m for n, m in student.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        packed = int4.get_submodule(name)
        assert isinstance(packed, PackedLinear)
        # the latent weight is exactly the dequantized INT4 weight
        assert torch.equal(layer.weight.detach(), packed.dequantize())
        codes4 = packed.quantized().codes.long()
        codes2 = layer.encode().codes.long()
        # each INT4 level maps to one INT2 level: four consecutive INT4 codes per INT2 code
        assert torch.equal(codes2, codes4 // 4), name
        # and no INT4 level sits on an INT2 rounding tie
        x = layer.weight.detach() / layer.quantizer.delta.detach().abs()  # (out, in) / (out, 1)
        t = 2 * torch.clamp(x, -1 + EPS, 1 - EPS) - 0.5
        assert ((t - t.floor() - 0.5).abs() > 1e-3).all(), name


def test_delta_init_options(int4_dir: Path) -> None:
    a = progressive_student(int4_dir, delta_init="max").model
    b = progressive_student(int4_dir, delta_init="int4").model
    int4 = load(int4_dir)
    name = "model.layers.0.self_attn.q_proj"
    w4 = int4.get_submodule(name).dequantize()
    assert torch.allclose(a.get_submodule(name).quantizer.delta, w4.abs().amax(dim=1, keepdim=True))
    assert torch.allclose(b.get_submodule(name).quantizer.delta, int4.get_submodule(name).scale.float())


def test_mse_delta_init_lowers_the_int2_weight_error(int4_dir: Path, tiny_model_dir: Path) -> None:
    def total_error(model) -> float:
        return sum(float((m.quantizer.fake_quant(m.weight) - m.weight).pow(2).sum())
                   for m in model.modules() if isinstance(m, QuantLinear))

    with torch.no_grad():
        plain = progressive_student(int4_dir, delta_init="max")
        searched = progressive_student(int4_dir, delta_init="mse")
        assert searched.info["delta_init"] == "mse"
        assert total_error(searched.model) < 0.8 * total_error(plain.model)
        direct_plain = direct_student(str(tiny_model_dir))
        direct_mse = direct_student(str(tiny_model_dir), delta_init="mse")
        assert total_error(direct_mse.model) < 0.8 * total_error(direct_plain.model)
    with pytest.raises(ValueError, match="SEQ grid"):
        progressive_student(int4_dir, GridSpec("asym", 2, 32), delta_init="mse")
    with pytest.raises(ValueError, match="direct student"):
        direct_student(str(tiny_model_dir), delta_init="int4")


def test_only_latent_weights_and_scales_train(int4_dir: Path) -> None:
    model = progressive_student(int4_dir).model
    groups = trainable_groups(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in groups["weights"] + groups["scales"]}
    assert len(groups["weights"]) == 14 and len(groups["scales"]) == 14
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.lm_head.weight.requires_grad


def test_scale_only_and_norm_training_choices(int4_dir: Path) -> None:
    model = progressive_student(int4_dir, train=("scales",)).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 and all(n.endswith("quantizer.delta") for n in trainable)
    model = progressive_student(int4_dir, train=("scales", "norms")).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    norms = [n for n in trainable if "norm" in n]
    assert len(norms) == 2 * 2 + 1  # two per block and the final norm
    with pytest.raises(ValueError, match="train must be"):
        progressive_student(int4_dir, train=("biases",))


def test_direct_init_starts_from_original_weights(tiny_model_dir: Path) -> None:
    student = direct_student(str(tiny_model_dir))
    from upq.models import load_model

    original, _ = load_model(str(tiny_model_dir))
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(student.model.get_submodule(name).weight.detach(), original.get_submodule(name).weight)
    assert student.info["init"] == "direct"


def test_clear_errors(tiny_model_dir: Path, int4_dir: Path) -> None:
    with pytest.raises(ValueError, match="--from"):
        build_student("progressive")
    with pytest.raises(ValueError, match="not a upq checkpoint"):
        progressive_student(tiny_model_dir)
    with pytest.raises(ValueError, match="init must be"):
        build_student("sideways", model_name=str(tiny_model_dir))
    with pytest.raises(ValueError, match="same groups"):
        progressive_student(int4_dir, GridSpec("seq", 2, 32), delta_init="int4")


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_student_releases_the_model_file_mapping(tiny_model_dir: Path) -> None:
    """The original weights' file is memory-mapped while loading; the built student keeps no view
    of it, so the pages of the replaced weights are not held in the trainer's memory."""
    import gc

    from upq.models import load_model

    weights_file = str(tiny_model_dir / "model.safetensors")
    probe, _ = load_model(str(tiny_model_dir))
    assert weights_file in _mapped_files()  # loading maps the file: the check below can fail
    original = probe.get_input_embeddings().weight.detach().clone()
    del probe
    gc.collect()
    student = direct_student(str(tiny_model_dir))
    gc.collect()
    assert weights_file not in _mapped_files()
    embedding = student.model.get_input_embeddings().weight
    assert not embedding.requires_grad and torch.equal(embedding, original)
