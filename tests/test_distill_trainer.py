"""Distill-QAT loop on the tiny model: learning, exact resume, NaN guard, losses, packed output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_helpers import one_thread, tiny_config, write_corpus, write_int4  # noqa: F401 (fixture)
from upq.checkpoint import load, read_quantization_config
from upq.distill.state import ResumeError, latest_checkpoint
from upq.distill.config import DistillConfig
from upq.distill.trainer import NonFiniteLossError, _teacher_dtype, distill, read_metrics
from upq.precision import use_bf16
from upq.trainable import lr_factor
from upq.modules import PackedLinear


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distill")
    return write_int4(tiny_model_dir, root / "int4"), write_corpus(root / "corpus.txt")


def _losses(work: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(work) if r["step"] > 0]


def test_training_lowers_the_distillation_loss_and_saves_a_packed_student(setup, tmp_path: Path) -> None:
    int4, corpus = setup
    cfg = tiny_config(int4, corpus, steps=30, eval_every=30, save_every=30)
    result = distill(cfg, tmp_path / "out", tmp_path / "work")
    records = read_metrics(tmp_path / "work")
    first, last = records[0]["heldout_kl"], records[-1]["heldout_kl"]
    assert last < 0.8 * first, (first, last)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert {"loss", "lr_weight", "lr_scale", "grad_norm", "tokens_per_s", "memory_mib"} <= set(records[2])
    model = load(tmp_path / "out")
    assert sum(isinstance(m, PackedLinear) and m.spec.bits == 2 for m in model.modules()) == 14
    qc = read_quantization_config(tmp_path / "out")
    assert qc["method"] == "upq-distill" and qc["recipe"]["loss"] == "gjsd"
    assert qc["training"]["steps"] == 30 and qc["source_model"]


def test_resume_after_interruption_reproduces_the_loss_sequence(setup, tmp_path: Path) -> None:
    int4, corpus = setup
    cfg = tiny_config(int4, corpus, steps=8, save_every=3, grad_accum=2, eval_every=4)
    full = distill(cfg, tmp_path / "a-out", tmp_path / "a")

    def kill(record: dict) -> None:
        if record["step"] == 5:  # checkpoint at 3; steps 4-5 are lost and recomputed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(cfg, None, tmp_path / "b", on_step=kill)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000003"
    resumed = distill(cfg, tmp_path / "b-out", tmp_path / "b")
    assert resumed.resumed_from == 3
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a") == full.losses
    assert [r.get("heldout_kl") for r in read_metrics(tmp_path / "b")] == [r.get("heldout_kl") for r in read_metrics(tmp_path / "a")]
    a, b = load(tmp_path / "a-out").state_dict(), load(tmp_path / "b-out").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(setup, tmp_path: Path, monkeypatch) -> None:
    int4, corpus = setup
    import upq.distill.losses as losses

    real = losses.chunked_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("inf") if calls["n"] == 5 else value  # the 5th training micro-batch

    monkeypatch.setattr(losses, "chunked_loss", poisoned)  # what every bound loss calls
    cfg = tiny_config(int4, corpus, steps=8, save_every=2)
    with pytest.raises(NonFiniteLossError, match="step 5.*last good checkpoint"):
        distill(cfg, tmp_path / "out", tmp_path / "work")
    assert not (tmp_path / "out").exists()
    ckpt = latest_checkpoint(tmp_path / "work")
    assert ckpt.name == "step-00000004"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 4
    monkeypatch.setattr(losses, "chunked_loss", real)
    resumed = distill(cfg, tmp_path / "out", tmp_path / "work")  # resumes from the intact checkpoint
    assert resumed.resumed_from == 4 and resumed.steps == 8


def test_a_failed_checkpoint_write_is_one_clear_error_and_keeps_the_last(setup, tmp_path: Path, monkeypatch) -> None:
    int4, corpus = setup
    import upq.distill.state as state

    real = state.torch.save
    calls = {"n": 0}

    def short_write(obj, path, *args, **kwargs):  # what torch.save raises when the disk fills up
        calls["n"] += 1
        if calls["n"] == 4:  # optimizer.pt of the second checkpoint (step 4)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 146096064 vs 146095956")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(state.torch, "save", short_write)
    cfg = tiny_config(int4, corpus, steps=8, save_every=2)
    with pytest.raises(state.CheckpointWriteError, match=r"step-4 checkpoint .* MiB free there.*unexpected pos.*resume"):
        distill(cfg, tmp_path / "out", tmp_path / "work")
    assert latest_checkpoint(tmp_path / "work").name == "step-00000002"
    assert not list((tmp_path / "work").glob(".step-*"))  # no half-written directory left behind
    monkeypatch.setattr(state.torch, "save", real)
    assert distill(cfg, tmp_path / "out", tmp_path / "work").resumed_from == 2


def test_other_settings_cannot_resume_a_work_dir(setup, tmp_path: Path) -> None:
    int4, corpus = setup
    distill(tiny_config(int4, corpus, steps=2), None, tmp_path / "w")
    with pytest.raises(ResumeError, match="different run"):
        distill(tiny_config(int4, corpus, steps=2, lr_weight=5e-4), None, tmp_path / "w")


@pytest.mark.parametrize("loss", ["ntp", "cakld", "forward_kl", "reverse_kl"])
def test_every_loss_trains(setup, tmp_path: Path, loss: str) -> None:
    int4, corpus = setup
    result = distill(tiny_config(int4, corpus, steps=3, loss=loss), None, tmp_path / "w")
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    if loss == "cakld":
        assert 0.0 < result.summary["gamma"] < 1.0


@pytest.mark.parametrize("mode", ["mlp", "layers"])
def test_direct_init_and_recomputation_give_the_same_training(setup, tiny_model_dir: Path, tmp_path: Path,
                                                              mode: str) -> None:
    _, corpus = setup
    runs = {}
    for m in ("none", mode):
        cfg = tiny_config(None, corpus, student_init="direct", model=str(tiny_model_dir), steps=2,
                          gradient_checkpointing=m)
        runs[m] = distill(cfg, tmp_path / f"{m}-out", tmp_path / m)
    assert runs["none"].summary["student_init"]["init"] == "direct"
    assert runs[mode].losses == runs["none"].losses
    plain, recomputed = load(tmp_path / "none-out").state_dict(), load(tmp_path / f"{mode}-out").state_dict()
    assert plain.keys() == recomputed.keys()
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)


def test_block_cache_gives_the_same_training(setup, tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from upq.distill import memory
    from upq.kernels.native import load_native

    native = load_native()
    if native is None:
        pytest.skip("the native extension is unavailable")
    monkeypatch.setattr(memory, "BLOCK_CACHE_MIN_BYTES", 4096)  # the tiny model's tensors go through it too
    _, corpus = setup
    runs = {}
    for limit in (0, 1):  # off; a 1 MiB cache that also evicts
        cfg = tiny_config(None, corpus, student_init="direct", model=str(tiny_model_dir), steps=3, block_cache_mib=limit)
        hits = native.block_cache_stats()["hits"]
        runs[limit] = distill(cfg, tmp_path / f"{limit}-out", tmp_path / str(limit))
        assert (native.block_cache_stats()["hits"] > hits) == bool(limit)
    assert runs[1].losses == runs[0].losses
    plain, cached = load(tmp_path / "0-out").state_dict(), load(tmp_path / "1-out").state_dict()
    assert all(torch.equal(plain[k], cached[k]) for k in plain)


def test_lr_schedule_warms_up_then_decays() -> None:
    values = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert values[0] < values[9] <= 1.0 and values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:])) and values[-1] > 0.1


def test_chat_data_run_generates_once_and_reuses_the_cache(setup, tmp_path: Path) -> None:
    from upq.distill.data import ChatSettings, DataConfig

    int4, corpus = setup
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nname a fruit\nadd two numbers\n")
    data = DataConfig(kind="chat", seq_len=96, prompts_file=str(prompts), bundled_prompts=False, heldout_samples=2,
                      chat=ChatSettings(max_new_tokens=6, batch_size=4), cache_dir=str(tmp_path / "cache"))
    first = distill(tiny_config(int4, corpus, data=data, steps=2), None, tmp_path / "a")
    cached = sorted((tmp_path / "cache").glob("chat-*.json"))
    assert len(cached) == 2  # training prompts + held-out eval prompts
    stamps = [p.stat().st_mtime_ns for p in cached]
    second = distill(tiny_config(int4, corpus, data=data, steps=2), None, tmp_path / "b")
    assert [p.stat().st_mtime_ns for p in cached] == stamps and second.losses == first.losses
    records = read_metrics(tmp_path / "a")
    assert 0 < records[1]["loss_tokens"] < records[1]["input_tokens"]  # prompt tokens are masked out
    bf16 = tiny_config(int4, corpus, data=data, steps=2, mixed_precision="bf16", teacher_dtype="bfloat16")
    distill(bf16, None, tmp_path / "c")  # a bf16 teacher trains on the fp32 original's cached answers
    assert sorted((tmp_path / "cache").glob("chat-*.json")) == cached
    assert [p.stat().st_mtime_ns for p in cached] == stamps


def test_runs_with_different_precisions_share_one_process(setup, tmp_path: Path) -> None:
    int4, corpus = setup
    fp32 = distill(tiny_config(int4, corpus, steps=2, mixed_precision="no"), None, tmp_path / "a")
    bf16 = distill(tiny_config(int4, corpus, steps=2, mixed_precision="bf16"), None, tmp_path / "b")
    assert bf16.losses != fp32.losses and bf16.losses == pytest.approx(fp32.losses, rel=0.2)


@pytest.mark.parametrize("avx512_bf16,amx", [(False, False), (True, False), (False, True)])
def test_auto_precision_is_bf16_where_the_cpu_multiplies_bf16(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu, native = torch.device("cpu"), avx512_bf16 or amx
    auto = DistillConfig(student_init="direct", steps=1)
    assert use_bf16(auto.mixed_precision, cpu) is native
    assert _teacher_dtype(auto, cpu) == (torch.bfloat16 if native else torch.float32)
    cuda = torch.device("cuda")
    assert use_bf16(auto.mixed_precision, cuda) and _teacher_dtype(auto, cuda) == torch.bfloat16
    fp32 = DistillConfig(student_init="direct", steps=1, mixed_precision="no", teacher_dtype="float32")
    assert not use_bf16(fp32.mixed_precision, cpu) and _teacher_dtype(fp32, cpu) == torch.float32
    assert use_bf16("bf16", cpu)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux /proc only")
def test_peak_rss_is_the_process_own_not_its_parents() -> None:
    ballast = bytearray(1 << 30)
    ballast[:: 1 << 12] = b"\1" * len(ballast[:: 1 << 12])  # resident: one byte written per page
    probe = "from upq.peak_memory import peak_rss_mib; print(peak_rss_mib())"
    child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    del ballast
    assert 0 < float(child.stdout.split()[-1]) < 1024  # ru_maxrss would count the parent's > 1 GiB


def test_loss_schedule_switches_after_first_steps(setup, tmp_path: Path) -> None:
    int4, corpus = setup
    cfg = tiny_config(int4, corpus, steps=4, first_loss="forward_kl", first_loss_steps=2)
    distill(cfg, None, tmp_path / "work")
    names = [r["loss_name"] for r in read_metrics(tmp_path / "work") if r["step"] > 0]
    assert names == ["forward_kl", "forward_kl", "gjsd", "gjsd"]
    with pytest.raises(ValueError, match="go together"):
        tiny_config(int4, corpus, first_loss="forward_kl")


def test_scale_only_training_leaves_latent_weights(setup, tmp_path: Path) -> None:
    int4, corpus = setup
    result = distill(tiny_config(int4, corpus, steps=3, train=("scales",)), tmp_path / "out", tmp_path / "work")
    student = load(tmp_path / "out")
    start = load(int4)
    name = "model.layers.0.mlp.up_proj"
    # the INT2 codes of a scale-only run are the nested INT4 codes under the trained scales; the
    # latent weights did not move, so the codes equal a re-encoding of the INT4 weights
    from upq.grids.seq import seq_codes

    w4 = start.get_submodule(name).dequantize()
    scale = student.get_submodule(name).scale.float()
    assert torch.equal(student.get_submodule(name).quantized().codes, seq_codes(w4, scale, 2))
    assert result.summary["scale_rel_change_median"] > 0


def test_scale_eps_fix_moves_small_gradient_scales(setup, tmp_path: Path) -> None:
    """Delta gradients carry the LSQ factor and sit near Adam's usual eps: with eps 1e-8 the scales
    move less than with the fixed (tiny) eps."""
    int4, corpus = setup
    moved = {}
    for eps in (1e-8, 1e-12):
        cfg = tiny_config(int4, corpus, steps=3, train=("scales",), lr_scale=1e-3, scale_eps=eps)
        moved[eps] = distill(cfg, None, tmp_path / f"w{eps}").summary["scale_rel_change_median"]
    assert moved[1e-12] > moved[1e-8]
