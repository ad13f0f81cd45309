"""The INT4 -> INT2 hand-off choices and the INT2 block stage on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blockwise_helpers import assert_resume_is_bit_identical
from distill_helpers import one_thread, write_corpus  # noqa: F401 (fixture)
from upq.checkpoint import load, load_tokenizer, save_quantized
from upq.distill.student import Calibration, calibration_grams, progressive_student
from upq.grids import GridSpec
from upq.grids.base import to_groups
from upq.grids.seq import seq_codes, seq_levels, seq_output_error, seq_output_scale
from upq.modules import PackedLinear, QuantLinear
from upq.ptq.blockwise import BlockwiseConfig, Int2BlocksConfig, blockwise_ptq, block_error, load_latent_weights
from upq.ptq.handoff import SCALE_INITS, input_grams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def int4_g32(tiny_model_dir: Path, corpus: Path, tmp_path_factory) -> Path:
    """A block-wise PTQ SEQ INT4 g32 checkpoint of the tiny model (the stage-1 output)."""
    cfg = BlockwiseConfig(bits=4, group_size=32, samples=8, seq_len=32, epochs=1, calib_source=str(corpus))
    model, tokenizer, _ = blockwise_ptq(str(tiny_model_dir), cfg, tmp_path_factory.mktemp("w4") / "work")
    out = tmp_path_factory.mktemp("int4") / "ckpt"
    save_quantized(model, out, tokenizer, method="blockwise-ptq", extra={"source_model": str(tiny_model_dir)})
    return out


def _output_error(groups: torch.Tensor, delta: torch.Tensor, gram: torch.Tensor, bits: int) -> torch.Tensor:
    err = seq_levels(seq_codes(groups, delta.unsqueeze(-1), bits), delta.unsqueeze(-1), bits) - groups
    return seq_output_error(err, gram)


@pytest.mark.parametrize("group_len", [16, 64])
def test_output_search_never_worse_than_max_on_its_objective(group_len: int) -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 64, generator=gen)
    weight[:, :3] *= 8  # a few outlier columns, where the output-aware choice differs from the weight-MSE one
    x = torch.randn(200, 64, generator=gen) * torch.linspace(0.1, 3, 64)
    gram = x.T @ x
    groups = to_groups(weight, group_len)
    best = seq_output_scale(groups, gram, bits=2)
    peak = groups.abs().amax(-1)
    searched, plain = _output_error(groups, best, gram, 2), _output_error(groups, peak, gram, 2)
    assert (searched <= plain + 1e-6).all()
    assert searched.sum() < 0.9 * plain.sum()
    # the per-group objective is the group's own share of the output error: with one group it is exact
    if group_len == 64:
        err = seq_levels(seq_codes(groups, best.unsqueeze(-1), 2), best.unsqueeze(-1), 2) - groups
        direct = (x @ err.reshape(24, 64).T).pow(2).sum(0)
        assert torch.allclose(seq_output_error(err, gram).squeeze(-1), direct, rtol=1e-3)


def test_input_grams_sum_over_calls() -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(4, 3))
    xs = [torch.randn(2, 5, 4), torch.randn(1, 7, 4)]

    def run() -> None:
        for x in xs:
            layer(x)

    grams = input_grams(layer, ["0"], run)
    flat = torch.cat([x.reshape(-1, 4) for x in xs])
    assert torch.allclose(grams["0"], flat.T @ flat, atol=1e-5)
    with pytest.raises(RuntimeError, match="no calibration input"):
        input_grams(layer, ["0"], lambda: None)


@pytest.mark.parametrize("delta_init", SCALE_INITS)
def test_each_hand_off_keeps_int2_codes_and_scale_shape(int4_g32: Path, corpus: Path, delta_init: str) -> None:
    calibration = Calibration(samples=4, seq_len=32, source=str(corpus))
    student = progressive_student(int4_g32, GridSpec("seq", 2, 32), delta_init, calibration=calibration)
    int4 = load(int4_g32)
    layers = {n: m for n, m in student.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14 and student.info["delta_init"] == delta_init
    for name, layer in layers.items():
        assert layer.quantizer.delta.shape == (layer.out_features, layer.in_features // 32)
        assert (layer.quantizer.delta > 0).all()
        codes = layer.encode().codes
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 3
        assert torch.equal(layer.weight.detach(), int4.get_submodule(name).dequantize())


def test_output_hand_off_lowers_each_layers_output_error(int4_g32: Path, corpus: Path) -> None:
    calibration = Calibration(samples=4, seq_len=32, source=str(corpus))
    plain = progressive_student(int4_g32, GridSpec("seq", 2, 32), "max", calibration=calibration).model
    searched = progressive_student(int4_g32, GridSpec("seq", 2, 32), "output", calibration=calibration).model
    names = [n for n, m in plain.named_modules() if isinstance(m, QuantLinear)]
    int4 = load(int4_g32)
    grams = calibration_grams(int4, load_tokenizer(str(int4_g32)), names, calibration)
    for name in names:
        a, b = plain.get_submodule(name), searched.get_submodule(name)
        w = to_groups(a.weight.detach(), 32)
        gram = grams[name]
        assert _output_error(w, b.quantizer.delta.detach(), gram, 2).sum() <= _output_error(
            w, a.quantizer.delta.detach(), gram, 2).sum() * (1 + 1e-5), name


def test_relative_block_error_equalises_tokens() -> None:
    target = torch.ones(1, 3, 8)
    target[0, 0] *= 100  # a massive-activation token
    output = target * 1.1
    mse, rel = block_error(output, target, "mse"), block_error(output, target, "relative")
    assert mse[0, 0] > 1000 * mse[0, 1]
    assert torch.allclose(rel, torch.full_like(rel, 0.01))


def _int2_cfg(int4: Path, corpus: Path, **overrides) -> Int2BlocksConfig:
    base = dict(init_from=str(int4), group_size=32, samples=8, seq_len=32, epochs=2, lr_weight=1e-3,
                lr_scale=1e-2, calib_source=str(corpus))
    return Int2BlocksConfig(**(base | overrides))


def test_int2_block_stage_starts_from_int4_and_lowers_error(tiny_model_dir: Path, int4_g32: Path, corpus: Path,
                                                            tmp_path: Path) -> None:
    cfg = _int2_cfg(int4_g32, corpus, epochs=0)
    start, _, _ = blockwise_ptq(str(tiny_model_dir), cfg, tmp_path / "start")
    int4 = load(int4_g32)
    name = "model.layers.1.mlp.down_proj"
    layer, source = start.get_submodule(name), int4.get_submodule(name)
    assert layer.spec.bits == 2
    # the nested start: INT2 scale = INT4 scale, each INT2 code = INT4 code // 4
    assert torch.allclose(layer.scale.float(), source.scale.float())
    assert torch.equal(layer.quantized().codes.long(), source.quantized().codes.long() // 4)
    _, _, trained = blockwise_ptq(str(tiny_model_dir), _int2_cfg(int4_g32, corpus, objective="relative"),
                                  tmp_path / "trained")
    assert all(r.mse_after < r.mse_before for r in trained)


def test_int2_block_stage_resumes_bit_identically(tiny_model_dir: Path, int4_g32: Path, corpus: Path,
                                                  tmp_path: Path) -> None:
    cfg = _int2_cfg(int4_g32, corpus, delta_init="output", epochs=1)
    assert_resume_is_bit_identical(tiny_model_dir, cfg, tmp_path)


def test_int2_block_config_errors(tiny_model_dir: Path, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="delta_init must be"):
        Int2BlocksConfig(init_from="x", delta_init="biggest")
    with pytest.raises(ValueError, match="set init_from"):
        BlockwiseConfig(delta_init="int4")
    with pytest.raises(ValueError, match="objective"):
        BlockwiseConfig(objective="l1")
    with pytest.raises(ValueError, match="not a upq checkpoint"):
        blockwise_ptq(str(tiny_model_dir), _int2_cfg(tmp_path, corpus), tmp_path / "w")


def test_block_stage_latent_weights_carry_into_the_student(tiny_model_dir: Path, int4_g32: Path, corpus: Path,
                                                           tmp_path: Path) -> None:
    model, tokenizer, _ = blockwise_ptq(str(tiny_model_dir), _int2_cfg(int4_g32, corpus, epochs=1), tmp_path / "work")
    ckpt = tmp_path / "int2"
    save_quantized(model, ckpt, tokenizer, method="int2-blocks", extra={"source_model": str(tiny_model_dir)})
    latent = load_latent_weights(tmp_path / "work")
    name = "model.layers.1.mlp.down_proj"
    packed = model.get_submodule(name)
    assert set(latent) == {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    # the latent weights are off the grid, and their rounding is exactly the packed codes
    assert not torch.equal(latent[f"{name}.weight"], packed.dequantize().float())
    student = progressive_student(ckpt, GridSpec("seq", 2, 32), "int4", latent_from=tmp_path / "work").model
    layer = student.get_submodule(name)
    assert torch.equal(layer.weight.detach(), latent[f"{name}.weight"])
    # up to the few weights on a boundary that the packed (float16) scale rounds the other way
    differ = (layer.dequantized_weight() - packed.dequantize().float()).abs() > 1e-4
    assert float(differ.float().mean()) < 1e-3
    plain = progressive_student(ckpt, GridSpec("seq", 2, 32), "int4").model.get_submodule(name)
    assert torch.equal(plain.weight.detach(), packed.dequantize().float())


def test_latent_weights_errors(tiny_model_dir: Path, int4_g32: Path, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a block-wise PTQ work directory"):
        load_latent_weights(tmp_path)
    blockwise_ptq(str(tiny_model_dir), _int2_cfg(int4_g32, corpus, epochs=1), tmp_path / "work")
    (tmp_path / "work" / "latent-0001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="re-run that stage"):
        load_latent_weights(tmp_path / "work")
    # latent weights of another run (the INT4 stage's work directory) do not round to the INT2 codes
    model, tokenizer, _ = blockwise_ptq(str(tiny_model_dir), _int2_cfg(int4_g32, corpus, epochs=1, seed=1),
                                        tmp_path / "other")
    save_quantized(model, tmp_path / "int2", tokenizer, method="int2-blocks")
    foreign = tmp_path / "foreign"
    blockwise_ptq(str(tiny_model_dir), BlockwiseConfig(bits=4, group_size=32, samples=8, seq_len=32, epochs=1,
                                                       calib_source=str(corpus)), foreign)
    with pytest.raises(ValueError, match="do not round to this checkpoint"):
        progressive_student(tmp_path / "int2", GridSpec("seq", 2, 32), "int4", latent_from=foreign)


def test_block_stage_can_train_norm_gains(tiny_model_dir: Path, int4_g32: Path, corpus: Path, tmp_path: Path) -> None:
    name = "model.layers.0.input_layernorm.weight"
    frozen, _, _ = blockwise_ptq(str(tiny_model_dir), _int2_cfg(int4_g32, corpus), tmp_path / "a")
    trained, _, results = blockwise_ptq(str(tiny_model_dir), _int2_cfg(int4_g32, corpus, train=("weights", "scales", "norms")),
                                        tmp_path / "b")
    original = load(int4_g32).state_dict()[name]
    assert torch.equal(frozen.state_dict()[name], original)
    assert not torch.equal(trained.state_dict()[name], original)
    assert all(r.mse_after < r.mse_before for r in results)
