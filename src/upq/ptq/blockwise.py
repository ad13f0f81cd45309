"""Block-wise reconstruction: UPQ stage 1 (FP -> INT4) and the optional INT2 block stage.

For each decoder block in order, the targets are the original block's outputs on the original
inputs, the inputs come from the already-quantized previous blocks, and the block's latent
weights and quantizer scales are trained to minimise the output MSE (Block-AP / OmniQuant style).
The latent weights start from the original block, or (``init_from``: a upq checkpoint, e.g. the
INT4 stage-1 output) from that checkpoint's dequantized block: INT4 -> INT2 block reconstruction
before distillation (EfficientQAT's Block-AP at 2 bits). The quantizer scales then start as
``delta_init`` says (:mod:`upq.ptq.handoff`; ``output`` measures each layer's inputs on the
block's quantized-path calibration inputs).
Only one block is materialised at a time: the model is a meta-device skeleton, each block is
read from the source safetensors when its turn comes, packed, written to the work directory
and dropped again, so memory does not grow with depth. Activations live in RAM or on disk.
A work directory holds a per-block checkpoint; re-running resumes at the next block.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from ..atomic import write_json_atomic
from ..checkpoint import install_packed_skeletons, materialize_meta_buffers, meta_model
from ..data.prompts import load_prompts
from ..data.self_instruct import SelfInstructSettings, self_instruct_pairs
from ..data.teacher_answers import ChatSettings, answer_rows, default_answer_cache, teacher_responses
from ..data.text import load_texts, token_blocks
from ..digest import json_digest
from ..grids import GridSpec
from ..logs import get_logger, progress_enabled
from ..models import fix_special_tokens, load_model, local_model_dir
from ..modules import PackedLinear, pack_model, quantize_model, select_linears
from ..peak_memory import peak_rss_mib
from ..precision import check_mixed_precision, use_bf16
from ..stages import PREVIOUS, StageContext, StageKind, register_stage
from ..trainable import check_trainable, lr_factor, trainable_groups
from ..weights import WeightSource
from .activations import ActivationStore
from .handoff import check_scale_init, init_scale, input_grams
from .layers import block_output, capture_first_block_inputs, decoder_layers

log = get_logger("ptq")
OBJECTIVES = ("mse", "relative")
LATENT_PREFIX = "latent-"  # work-directory files of the latent float weights, one per block
BLOCKS_DIR = "blocks"  # a recipe stage's block work directory, inside its stage directory


@dataclass
class BlockwiseConfig:
    """Settings of block-wise PTQ; every field is recorded in the output checkpoint.

    ``init_from``: a upq checkpoint whose dequantized blocks are the start (else the original
    weights); ``delta_init``: where the scales start (:mod:`upq.ptq.handoff`); ``objective``:
    what each block minimises (:func:`block_error`); ``train``: which parameters train
    (:mod:`upq.trainable`; norm gains at ``lr_scale``); ``chat_fraction``: the share of
    calibration rows that are the original model's answers (sampled as ``chat`` says; the same
    settings as distillation's ``data.chat`` share one cached generation) to the bundled training
    prompts and to ``self_instruct`` instructions it wrote itself (:mod:`upq.data.self_instruct`;
    the same pairs, and cache, as distillation's ``data.self_instruct`` with equal settings).
    ``mixed_precision``: bf16 autocast for the blocks' forward passes (``auto``: where the device
    multiplies bf16 natively, :func:`upq.precision.native_bf16`); weights, scales and stored
    activations stay fp32.
    """

    grid: str = "seq"
    bits: int = 4
    group_size: int | None = None
    samples: int = 128
    seq_len: int = 512
    epochs: int = 2
    batch_size: int = 4
    lr_weight: float = 1e-4
    lr_scale: float = 1e-3
    train: tuple[str, ...] = ("weights", "scales")
    calib_source: str = "wiki"
    chat_fraction: float = 0.0
    chat: ChatSettings = field(default_factory=ChatSettings)
    self_instruct: int = 0
    self_instruct_settings: SelfInstructSettings = field(default_factory=SelfInstructSettings)
    include: list[str] | None = None
    exclude: list[str] | None = None
    activations: str = "memory"
    init_from: str | None = None
    delta_init: str = "max"
    objective: str = "mse"
    mixed_precision: str = "auto"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.chat, dict):
            self.chat = ChatSettings(**self.chat)
        if isinstance(self.self_instruct_settings, dict):
            self.self_instruct_settings = SelfInstructSettings(**self.self_instruct_settings)
        if self.self_instruct < 0:
            raise ValueError(f"self_instruct (number of self-generated pairs) must be >= 0, got {self.self_instruct}")
        if self.self_instruct and not self.chat_fraction:
            raise ValueError("self_instruct adds chat calibration rows: set chat_fraction > 0")
        self.train = check_trainable(self.train)
        if self.activations not in {"memory", "disk"}:
            raise ValueError(f"activations must be 'memory' or 'disk', got {self.activations!r}")
        if not 0.0 <= self.chat_fraction <= 1.0:
            raise ValueError(f"chat_fraction must be in [0, 1], got {self.chat_fraction}")
        check_scale_init(self.delta_init)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        check_mixed_precision(self.mixed_precision)
        if self.delta_init == "int4" and self.init_from is None:
            raise ValueError("delta_init='int4' takes the scale of the checkpoint the block starts from; set init_from")
        if self.samples < 1 or self.batch_size < 1 or self.epochs < 0 or self.seq_len < 2:
            raise ValueError("samples, batch_size and seq_len must be positive and epochs >= 0")

    @property
    def spec(self) -> GridSpec:
        """The target grid."""
        return GridSpec(self.grid, self.bits, self.group_size)


@dataclass
class Int2BlocksConfig(BlockwiseConfig):
    """The INT2 block stage: block reconstruction at 2 bits, starting from the previous stage's
    checkpoint (``init_from``; in a recipe ``@previous``) with its scale nested (``int4``)."""

    bits: int = 2
    delta_init: str = "int4"


@dataclass
class BlockResult:
    """What happened to one block (``mse_*``: its error under the config's ``objective`` before and after training)."""

    index: int
    mse_before: float
    mse_after: float
    seconds: float
    peak_rss_mib: float
    peak_device_mib: float | None


def calibration_ids(tokenizer: Any, cfg: BlockwiseConfig, model_name: str | None = None) -> torch.Tensor:
    """(samples, seq_len) token ids: packed plain text, and ``chat_fraction`` of the rows the
    original model's own answers to the bundled training prompts, then to its ``self_instruct``
    instructions (packed prompt + answer, cached and shared with distillation; text fills in
    when the answers run out)."""
    n_chat = round(cfg.samples * cfg.chat_fraction)
    rows = []
    if n_chat:
        rows.append(_answer_rows(tokenizer, model_name, cfg, n_chat))
        if len(rows[0]) < n_chat:
            log.warning("the teacher's answers fill only %d of %d chat calibration rows of %d tokens; the rest is "
                        "text (self_instruct: N adds teacher-written instructions)", len(rows[0]), n_chat, cfg.seq_len)
    n_text = cfg.samples - sum(len(r) for r in rows)
    if n_text:
        rows.insert(0, token_blocks(load_texts(cfg.calib_source, "train"), tokenizer, cfg.seq_len, n_text))
    return torch.cat(rows)


def _answer_rows(tokenizer: Any, model_name: str | None, cfg: BlockwiseConfig, rows: int) -> torch.Tensor:
    model, _ = load_model(model_name, dtype=torch.float32)
    cache = default_answer_cache()
    responses = teacher_responses(model, tokenizer, load_prompts("train"), cfg.chat, cache)
    if cfg.self_instruct:
        responses = responses + self_instruct_pairs(model, tokenizer, cfg.self_instruct, cfg.self_instruct_settings,
                                                    cfg.chat, cache)
    del model
    return answer_rows(responses, cfg.seq_len, rows)


def _fingerprint(model_name: str, cfg: BlockwiseConfig) -> str:
    return json_digest({"model": model_name, "config": asdict(cfg)})


def _latent_file(work_dir: Path, index: int) -> Path:
    return work_dir / f"{LATENT_PREFIX}{index:04d}.safetensors"


class _WorkDir:
    """Per-block checkpoints: packed block tensors, the activations entering the next block, state.json."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        path.mkdir(parents=True, exist_ok=True)
        self.state_file = path / "state.json"

    def load_state(self) -> dict[str, Any] | None:
        if not self.state_file.is_file():
            return None
        state = json.loads(self.state_file.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise RuntimeError(
                f"work directory {self.path} belongs to a different run (other model or settings); "
                "delete it or choose another --work-dir"
            )
        return state

    def block_file(self, index: int) -> Path:
        return self.path / f"block-{index:04d}.safetensors"

    def latent_file(self, index: int) -> Path:
        return _latent_file(self.path, index)

    def acts_files(self, index: int) -> tuple[Path, Path]:
        return self.path / f"inputs-fp-{index:04d}.npy", self.path / f"inputs-q-{index:04d}.npy"

    def commit_block(self, index: int, tensors: dict[str, torch.Tensor], latent: dict[str, torch.Tensor],
                     fp: ActivationStore, q: ActivationStore, state: dict[str, Any]) -> None:
        for path, content in ((self.latent_file(index), latent), (self.block_file(index), tensors)):
            tmp = path.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in content.items()}, tmp)
            tmp.replace(path)
        fp_file, q_file = self.acts_files(index + 1)
        fp.save(fp_file)
        q.save(q_file)
        write_json_atomic(self.state_file, state)
        for old in self.acts_files(index):
            old.unlink(missing_ok=True)


def _materialize_block(layers: torch.nn.ModuleList, index: int, source: WeightSource, prefix: str,
                       device: torch.device) -> torch.nn.Module:
    block = layers[index].to_empty(device="cpu")
    weights = source.with_prefix(f"{prefix}{index}.")
    missing, unexpected = block.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"block {index}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return block.float().to(device)


class _PackedStart:
    """The packed layers of a upq checkpoint, read one block at a time (the start of a lower-bit stage)."""

    def __init__(self, path: str | Path) -> None:
        from ..checkpoint import read_quantization_config

        config = read_quantization_config(path)
        if config is None:
            raise ValueError(f"init_from: {path} is not a upq checkpoint directory")
        self.modules: dict[str, dict[str, Any]] = config["modules"]
        self.source = WeightSource(path)

    def block_layers(self, block: torch.nn.Module, prefix: str) -> dict[str, PackedLinear]:
        """Relative name -> packed layer of the checkpoint for every linear of ``block`` it quantized."""
        layers = {}
        for full, spec in self.modules.items():
            if not full.startswith(prefix):
                continue
            name = full[len(prefix):]
            linear = block.get_submodule(name)
            packed = PackedLinear(linear.in_features, linear.out_features,
                                  GridSpec(spec["grid"], spec["bits"], spec["group_size"]), linear.bias is not None)
            tensors = self.source.with_prefix(f"{full}.")
            packed.load_state_dict({k: v.to(packed.state_dict()[k].dtype) for k, v in tensors.items()})
            layers[name] = packed
        return layers


def _start_block(block: torch.nn.Module, start: _PackedStart | None, prefix: str) -> dict[str, PackedLinear]:
    """Overwrite ``block``'s linear weights with the start checkpoint's dequantized ones; return its layers."""
    if start is None:
        return {}
    layers = start.block_layers(block, prefix)
    if not layers:
        raise ValueError(f"init_from checkpoint has no quantized layer in block {prefix!r}")
    with torch.no_grad():
        for name, packed in layers.items():
            block.get_submodule(name).weight.copy_(packed.dequantize().float())
    return layers


def _quantize_block(block: torch.nn.Module, cfg: "BlockwiseConfig", prefix: str, starts: dict[str, PackedLinear],
                    inputs: ActivationStore, kwargs: dict[str, Any], device: torch.device, autocast: bool) -> list[str]:
    """Swap the selected linears of ``block`` for ``QuantLinear`` with their scales at ``cfg.delta_init``.

    For ``output``, each layer's input Gram matrix is measured first on ``inputs`` (the quantized
    path), with the block still holding its float (start) weights. Returns the quantized names.
    """
    grams: dict[str, torch.Tensor] = {}
    if cfg.delta_init == "output":
        chosen = [name for name, _ in select_linears(block, cfg.include, cfg.exclude, prefix)]
        grams = input_grams(block, chosen, lambda: _run_block(block, inputs, None, kwargs, cfg.batch_size, device,
                                                              autocast))
    names = quantize_model(block, cfg.spec, cfg.include, cfg.exclude, prefix=prefix)
    for name in names:
        init_scale(block.get_submodule(name), cfg.delta_init, starts.get(name), grams.pop(name, None))
    return names


def _kwargs_to(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return {k: move(v) for k, v in kwargs.items()}


def _run_block(block: torch.nn.Module, store: ActivationStore, out: ActivationStore | None, kwargs: dict[str, Any],
               batch_size: int, device: torch.device, autocast: bool) -> None:
    """Run ``block`` over every row of ``store``, writing the outputs to ``out`` (None: discard)."""
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for start in range(0, len(store), batch_size):
            x = store.batch(slice(start, start + batch_size), device, torch.float32)
            y = block_output(block(x, **kwargs))
            if out is not None:
                out.write(start, y)


def block_error(output: torch.Tensor, target: torch.Tensor, objective: str) -> torch.Tensor:
    """Per-token reconstruction error (batch, seq) of a block's ``output`` against ``target``.

    ``mse``: the mean squared error over the hidden size. ``relative``: the squared error divided
    by the target's squared norm, so that the few massive-activation tokens (attention sinks,
    residual norms hundreds of times the rest) do not dominate the objective.
    """
    sq = (output.float() - target).pow(2).sum(dim=-1)
    if objective == "relative":
        return sq / target.pow(2).sum(dim=-1).clamp_min(1e-6)
    return sq / target.shape[-1]


def _error(block: torch.nn.Module, inputs: ActivationStore, targets: ActivationStore, kwargs: dict[str, Any],
           cfg: BlockwiseConfig, device: torch.device, autocast: bool) -> float:
    """The block's mean per-token error (``cfg.objective``) over the calibration rows."""
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for start in range(0, len(inputs), cfg.batch_size):
            x = inputs.batch(slice(start, start + cfg.batch_size), device, torch.float32)
            y = targets.batch(slice(start, start + cfg.batch_size), device, torch.float32)
            err = block_error(block_output(block(x, **kwargs)), y, cfg.objective)
            total += float(err.double().sum())
            count += err.numel()
    return total / count


def _train_block(block: torch.nn.Module, inputs: ActivationStore, targets: ActivationStore, kwargs: dict[str, Any],
                 cfg: BlockwiseConfig, index: int, device: torch.device, autocast: bool) -> None:
    for p in block.parameters():
        p.requires_grad_(False)
    lrs = {"weights": cfg.lr_weight, "scales": cfg.lr_scale, "norms": cfg.lr_scale}
    groups = [{"params": params, "lr": lrs[kind]} for kind, params in trainable_groups(block, cfg.train).items()
              if params]
    params = [p for g in groups for p in g["params"]]
    if not params or cfg.epochs == 0:
        return
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(inputs) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total))
    generator = torch.Generator().manual_seed(cfg.seed * 100003 + index)
    bar = tqdm(total=total, desc=f"block {index}", leave=False, disable=not progress_enabled())
    for _ in range(cfg.epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            x = inputs.batch(rows, device, torch.float32)
            y = targets.batch(rows, device, torch.float32)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = block_error(block_output(block(x, **kwargs)), y, cfg.objective).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"block {index}: loss became {loss.item()}; lower lr_weight/lr_scale. "
                    "Blocks finished so far are kept in the work directory."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
            bar.set_postfix(mse=f"{loss.item():.3e}")
    bar.close()
    for p in params:
        p.requires_grad_(False)


def blockwise_ptq(
    model_name: str | None,
    cfg: BlockwiseConfig,
    work_dir: str | Path,
    device: str | torch.device = "cpu",
    on_block_done: Callable[[BlockResult], None] | None = None,
) -> tuple[PreTrainedModel, Any, list[BlockResult]]:
    """Quantize ``model_name`` block by block; return (packed model on CPU, tokenizer, per-block results).

    Resumes from ``work_dir`` when it holds an interrupted run with the same model and settings.
    """
    device = torch.device(device)
    autocast = use_bf16(cfg.mixed_precision, device)
    log.info("block-wise PTQ %s: forward passes in %s", cfg.spec.describe(), "bf16 autocast" if autocast else "fp32")
    spec = cfg.spec
    source_dir = local_model_dir(model_name)
    source = WeightSource(source_dir)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    model = meta_model(AutoConfig.from_pretrained(source_dir))
    fix_special_tokens(model, tokenizer)
    layers_name, layers = decoder_layers(model)
    prefix = f"{layers_name}."
    outside = {k: source.get(k) for k in model.state_dict() if not k.startswith(prefix) and k in source.keys()}
    model.load_state_dict({k: v.float() for k, v in outside.items()}, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    materialize_meta_buffers(model)
    work = _WorkDir(Path(work_dir), _fingerprint(str(model_name), cfg))
    start_checkpoint = _PackedStart(cfg.init_from) if cfg.init_from is not None else None
    state = work.load_state()
    n_blocks = len(layers)
    ids = calibration_ids(tokenizer, cfg, model_name)
    _, kwargs = capture_first_block_inputs(model, layers, ids[:1])
    kwargs = _kwargs_to(kwargs, device)
    hidden = model.config.hidden_size
    shape = (ids.shape[0], ids.shape[1], hidden)
    on_disk = cfg.activations == "disk"
    if state is None:
        state = {"fingerprint": work.fingerprint, "done": 0, "modules": {}, "blocks": []}
        x_fp = ActivationStore(shape, work.path / "cur-fp-0000.npy" if on_disk else None)
        for start in range(0, ids.shape[0], cfg.batch_size):
            first, _ = capture_first_block_inputs(model, layers, ids[start : start + cfg.batch_size])
            x_fp.write(start, first)
        x_q = ActivationStore(shape, work.path / "cur-q-0000.npy" if on_disk else None)
        x_q.data.copy_(x_fp.data)
    else:
        log.info("resuming block-wise PTQ at block %d/%d from %s", state["done"], n_blocks, work.path)
        fp_file, q_file = work.acts_files(state["done"])
        done = state["done"]
        x_fp = ActivationStore.load(fp_file, work.path / f"cur-fp-{done:04d}.npy" if on_disk else None)
        x_q = ActivationStore.load(q_file, work.path / f"cur-q-{done:04d}.npy" if on_disk else None)
    results = [BlockResult(**b) for b in state["blocks"]]
    bar = tqdm(total=n_blocks, initial=state["done"], desc=f"block-wise PTQ {spec.describe()}", disable=not progress_enabled())
    for index in range(state["done"], n_blocks):
        started = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        block = _materialize_block(layers, index, source, prefix, device)
        targets = ActivationStore(shape, work.path / f"cur-fp-{index + 1:04d}.npy" if on_disk else None)
        _run_block(block, x_fp, targets, kwargs, cfg.batch_size, device, autocast)
        starts = _start_block(block, start_checkpoint, f"{prefix}{index}.")
        names = _quantize_block(block, cfg, f"{prefix}{index}.", starts, x_q, kwargs, device, autocast)
        mse_before = _error(block, x_q, targets, kwargs, cfg, device, autocast)
        initial = {k: v.detach().clone() for k, v in block.state_dict().items()}
        _train_block(block, x_q, targets, kwargs, cfg, index, device, autocast)
        mse_after = _error(block, x_q, targets, kwargs, cfg, device, autocast)
        if mse_after > mse_before:
            log.warning("block %d: training raised the MSE (%.3e -> %.3e); keeping the round-to-nearest start "
                        "(consider lower learning rates)", index, mse_before, mse_after)
            block.load_state_dict(initial)
            mse_after = mse_before
        del initial
        next_q = ActivationStore(shape, work.path / f"cur-q-{index + 1:04d}.npy" if on_disk else None)
        _run_block(block, x_q, next_q, kwargs, cfg.batch_size, device, autocast)
        latent = {f"{prefix}{index}.{name}.weight": block.get_submodule(name).weight.detach().cpu().clone()
                  for name in names}
        pack_model(block)
        block_tensors = {f"{prefix}{index}.{k}": v.detach().cpu() for k, v in block.state_dict().items()}
        for name in names:
            state["modules"][f"{prefix}{index}.{name}"] = {"grid": spec.grid, "bits": spec.bits, "group_size": spec.group_size}
        for old in (x_fp, x_q):
            old.release()
        x_fp, x_q = targets, next_q
        result = BlockResult(
            index, mse_before, mse_after, round(time.perf_counter() - started, 2), round(peak_rss_mib(), 1),
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        )
        state["done"] = index + 1
        state["blocks"].append(asdict(result))
        work.commit_block(index, block_tensors, latent, x_fp, x_q, state)
        layers[index] = block.to("meta")
        del block
        results.append(result)
        log.debug("block %d: mse %.4e -> %.4e in %.1fs, peak RSS %.0f MiB", index, mse_before, mse_after,
                  result.seconds, result.peak_rss_mib)
        bar.update(1)
        bar.set_postfix(mse=f"{mse_before:.2e}->{mse_after:.2e}")
        if on_block_done is not None:
            on_block_done(result)
    bar.close()
    return _assemble(model, work, state, n_blocks), tokenizer, results


def _assemble(model: PreTrainedModel, work: _WorkDir, state: dict[str, Any], n_blocks: int) -> PreTrainedModel:
    """Load every packed block from the work directory into the skeleton."""
    layers_name, layers = decoder_layers(model)
    for index in range(n_blocks):
        layers[index] = layers[index].to("meta")
    install_packed_skeletons(model, state["modules"])
    tensors: dict[str, torch.Tensor] = {}
    for index in range(n_blocks):
        tensors.update(load_file(work.block_file(index)))
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k.startswith(f"{layers_name}.")]
    if missing or unexpected:
        raise RuntimeError(f"work directory {work.path} is incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        raise RuntimeError("some weights were never loaded while assembling the quantized model")
    return model.eval()


def load_latent_weights(work_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full layer name + ``.weight`` -> the float latent weight each block's training ended with.

    Block-wise PTQ keeps these in its work directory beside the packed blocks: the packed codes
    are their rounding, and a later training stage that starts from them (instead of the
    dequantized codes, which sit exactly on grid levels) can still move weights that ended
    close to a decision boundary.
    """
    path = Path(work_dir)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a block-wise PTQ work directory (no state.json)")
    done = json.loads(state_file.read_text())["done"]
    files = [_latent_file(path, index) for index in range(done)]
    missing = [f.name for f in files if not f.is_file()]
    if missing or not files:
        raise FileNotFoundError(f"{path} has no latent weights for {len(missing) or 'any'} block(s) "
                                f"(e.g. {missing[:1]}); it was made before latent weights were kept, re-run that stage")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def packed_layer_count(model: torch.nn.Module) -> int:
    """Number of packed linears in ``model``."""
    return sum(isinstance(m, PackedLinear) for m in model.modules())


def run_blockwise_stage(cfg: BlockwiseConfig, context: StageContext) -> dict[str, Any]:
    """The ``ptq`` / ``int2-blocks`` stage: block-wise PTQ from the float model (or ``init_from``), packed checkpoint out."""
    from ..checkpoint import save_quantized
    from ..models import BUNDLED_MODEL

    kind = "int2-blocks" if isinstance(cfg, Int2BlocksConfig) else "ptq"
    cfg = replace(cfg, init_from=context.previous(cfg.init_from, "checkpoint", kind))
    model, tokenizer, blocks = blockwise_ptq(context.float_model, cfg, context.stage_dir / BLOCKS_DIR, device=context.device)
    save_quantized(model, context.out, tokenizer, method="blockwise-ptq", recipe=asdict(cfg),
                   extra={"source_model": context.model or BUNDLED_MODEL, "blocks": [asdict(b) for b in blocks]})
    return {"blocks": len(blocks), "mse_before_mean": sum(b.mse_before for b in blocks) / len(blocks),
            "mse_after_mean": sum(b.mse_after for b in blocks) / len(blocks)}


def _starts_from_previous(values: dict[str, Any]) -> None:
    values.setdefault("init_from", PREVIOUS)


register_stage(StageKind("ptq", BlockwiseConfig, run_blockwise_stage, latent_dir=BLOCKS_DIR))
register_stage(StageKind("int2-blocks", Int2BlocksConfig, run_blockwise_stage, latent_dir=BLOCKS_DIR,
                         recipe_defaults=_starts_from_previous))
