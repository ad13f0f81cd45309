"""Command line: ``upq quantize | recipes | eval | lm-eval | export | distill | self-instruct | generate | chat``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from .atomic import write_json_atomic
from .cli_fields import FieldMap, config_from_args, field_flag_adder, flag_default
from .grids import GRIDS
from .logs import get_logger, setup_logging
from .interactive import ENGINES
from .kernels.ops import BACKENDS
from .precision import MIXED_PRECISION
from .recipes.schema import BUDGETS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="only warnings and the final result")
    parser.add_argument("--log-file", help="also write a detailed log here")


def _quantize(args: argparse.Namespace) -> int:
    from .checkpoint import save_quantized
    from .grids import GridSpec, parse_group_size
    from .models import BUNDLED_MODEL, load_model
    from .ptq.blockwise import BlockwiseConfig, blockwise_ptq
    from .ptq.rtn import RTNStage, rtn_quantize

    log = get_logger("quantize")
    if args.recipe:
        return _run_recipe(args)
    method_config = RTNStage if args.method == "rtn" else BlockwiseConfig
    grid_flags = {dest: getattr(args, dest) if getattr(args, dest) is not None else flag_default(method_config, GRID_FIELDS, dest)
                  for dest in GRID_FIELDS}  # the grid defaults differ by method: each method config's own
    spec = GridSpec(grid_flags["grid"], grid_flags["bits"], parse_group_size(grid_flags["group_size"]))
    start = time.perf_counter()
    extra: dict = {"source_model": args.model or BUNDLED_MODEL}
    if args.method == "rtn":
        model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
        rtn_quantize(model, spec, args.include, args.exclude)
        recipe = {"method": args.method, "grid": spec.grid, "bits": spec.bits, "group_size": spec.group_size,
                  "include": args.include, "exclude": args.exclude}
    else:
        cfg = config_from_args(BlockwiseConfig, BLOCKWISE_FIELDS, args, grid=spec.grid, bits=spec.bits,
                               group_size=spec.group_size)
        work_dir = Path(args.work_dir or f"{args.out.rstrip('/')}.work")
        model, tokenizer, blocks = blockwise_ptq(args.model, cfg, work_dir, device=args.device)
        recipe = {"method": args.method, **asdict(cfg)}
        extra["blocks"] = [asdict(b) for b in blocks]
        extra["wall_time_s"] = round(time.perf_counter() - start, 1)
    log.info("quantized %s to %s with %s", args.model or BUNDLED_MODEL, spec.describe(), args.method)
    out = save_quantized(model, args.out, tokenizer, method=args.method, recipe=recipe, extra=extra)
    if args.method != "rtn" and not args.keep_work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    log.info("wrote %s in %.1fs total", out, time.perf_counter() - start)
    print(json.dumps({"out": str(out), "method": args.method, "grid": spec.describe(),
                      "seconds": round(time.perf_counter() - start, 1)}))
    return 0


def _run_recipe(args: argparse.Namespace) -> int:
    from .api import quantize

    start = time.perf_counter()
    out = quantize(args.model, args.recipe, args.budget, args.out, args.set, args.work_dir, args.device, args.keep_work_dir,
                   args.add_stage or ())
    print(json.dumps({"out": str(out), "recipe": args.recipe, "budget": args.budget,
                      "seconds": round(time.perf_counter() - start, 1)}))
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from .recipes.schema import builtin_recipes, read_recipe_file

    raws = {name: read_recipe_file(name) for name in builtin_recipes()}
    stages = {name: " -> ".join(s.get("stage", "?") for s in raw.get("stages", [])) for name, raw in raws.items()}
    width = max(map(len, stages.values()))
    for name, raw in raws.items():
        print(f"{name:14s} {stages[name]:{width}s} {' '.join(str(raw.get('description', '')).split())}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluation.report import compare_table, read_json
    from .api import evaluate
    from .evaluation.runner import headline

    if args.compare:
        print(compare_table([read_json(p) for p in args.compare]))
        return 0
    if not args.model:
        raise ValueError("give a MODEL to evaluate, or --compare A.json B.json ...")
    settings = {field: getattr(args, dest) for dest, (field,) in EVAL_FIELDS.items()}
    settings["tasks"] = [t.strip() for t in settings["tasks"].split(",") if t.strip()]
    result = evaluate(None if args.model == "bundled" else args.model, reference=args.reference, device=args.device,
                      **settings)
    if args.out:
        write_json_atomic(args.out, result)
    print(headline(result))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .api import export

    options = {"tokenizer_pre": args.tokenizer_pre, "strict": args.strict} if args.format == "gguf" else {}
    result = export(args.checkpoint, args.out, args.format, args.dtype, **options)
    if args.format == "gguf":
        report_path = write_json_atomic(f"{args.out}.report.json", result.to_dict())
        print(result.table())
        for note in result.notes:
            print(f"note: {note}")
        get_logger("export").info("wrote %s (report: %s)", args.out, report_path)
    else:
        get_logger("export").info("wrote a plain transformers checkpoint to %s", result)
    return 0


def _lm_eval(args: argparse.Namespace) -> int:
    from .atomic import write_text_atomic
    from .lm_eval_adapter import results_json, results_table, run_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("give at least one lm-eval task with --tasks")
    batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        results = run_tasks(None if args.model == "bundled" else args.model, tasks, args.include_path,
                            args.num_fewshot, limit, batch, args.device)
    except ImportError as exc:
        raise RuntimeError(str(exc)) from exc
    if args.out:
        write_text_atomic(args.out, results_json(results))
    print(results_table(results))
    return 0


def _distill(args: argparse.Namespace) -> int:
    from .distill.config import DistillConfig
    from .distill.trainer import NonFiniteLossError, distill

    log = get_logger("distill")
    if args.student_init == "progressive" and not args.int4_dir:
        raise ValueError("--student-init progressive needs --from INT4_DIR (a stage-1 checkpoint)")
    cfg = config_from_args(DistillConfig, DISTILL_FIELDS, args)
    work_dir = Path(args.work_dir or f"{args.out.rstrip('/')}.work")
    try:
        result = distill(cfg, args.out, work_dir)
    except NonFiniteLossError as exc:
        log.error("error: %s", exc)
        return 3
    if result.out_dir is None:  # not the main process
        return 0
    if not args.keep_work_dir:
        for path in [*work_dir.glob("step-*"), work_dir / "latest.json"]:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    print(json.dumps({"out": str(result.out_dir), "method": "upq-distill", **{
        k: result.summary.get(k) for k in ("steps", "tokens", "seconds", "final_loss", "heldout_kl_first", "heldout_kl_last")}}))
    return 0


def _self_instruct(args: argparse.Namespace) -> int:
    from .atomic import write_text_atomic
    from .distill.data import ChatSettings, DataConfig
    from .data.self_instruct import SelfInstructSettings, self_instruct_pairs
    from .models import BUNDLED_MODEL, load_model

    if args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    model = None if args.model in (None, "bundled") else args.model
    if model is not None and model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"model not found: {model}")
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        if out.is_dir():
            raise ValueError(f"--out {out} is a directory; give a .jsonl file path")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create the directory of --out {out}: {exc.strerror or exc}") from None
    teacher, tokenizer = load_model(model, dtype=DTYPES[args.dtype], device=args.device)
    cache = Path(args.data_cache).expanduser() if args.data_cache else DataConfig().response_cache()
    pairs = self_instruct_pairs(teacher, tokenizer, args.count, SelfInstructSettings(), ChatSettings(seed=args.seed),
                                cache)
    lines = [json.dumps({"instruction": p["instruction"], "response": tokenizer.decode(
        p["response_ids"], skip_special_tokens=True).strip(), "finished": p["finished"]}, ensure_ascii=False)
        for p in pairs]
    if out is None:
        print("\n".join(lines))
        return 0
    write_text_atomic(out, "".join(line + "\n" for line in lines))
    print(json.dumps({"out": str(out), "pairs": len(pairs), "model": args.model or BUNDLED_MODEL, "seed": args.seed}))
    return 0


def _load_for_generation(args: argparse.Namespace):
    """(model, tokenizer) for ``upq generate`` / ``upq chat``, with the PackedLinear backend set."""
    from .loading import load_any
    from .modules import set_backend

    model, tokenizer = load_any(None if args.model == "bundled" else args.model, dtype=DTYPES[args.dtype],
                                device=args.device)
    count = set_backend(model, args.backend)
    if count and not args.no_fuse:
        from .fusion import fuse_siblings

        fuse_siblings(model)
    if count and args.backend != "reference":
        from .kernels import native_info

        info = native_info()
        get_logger("generate").info("%d packed layers, backend %s (native kernel: %s)", count, args.backend,
                                    info["isa"] if info["available"] else f"unavailable: {info['error']}")
    return model, tokenizer


def _sampling(args: argparse.Namespace):
    from .interactive import SamplingSettings

    return SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, cache=args.cache)


def _generate(args: argparse.Namespace) -> int:
    from .interactive import encode_chat, stream_generate

    model, tokenizer = _load_for_generation(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.no_chat:
        ids = list(tokenizer(prompt)["input_ids"])
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        ids = encode_chat(tokenizer, messages)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    _, stats = stream_generate(model, tokenizer, ids, _sampling(args), write=write, engine=args.engine)
    get_logger("generate").info("[%s]", stats.describe())
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .interactive import chat_loop

    model, tokenizer = _load_for_generation(args)
    chat_loop(model, tokenizer, _sampling(args), system=args.system, show_stats=not args.quiet, engine=args.engine)
    return 0


def _add_generation_parsers(sub) -> None:
    """``upq generate`` and ``upq chat``."""
    for name, help_text in (("generate", "generate a response to one prompt, streaming it"),
                            ("chat", "chat with a model in the terminal (streaming)")):
        g = sub.add_parser(name, help=help_text)
        g.add_argument("model", help="upq checkpoint, transformers dir, hub id, or 'bundled'")
        if name == "generate":
            g.add_argument("--prompt", required=True, help="the prompt ('-' reads stdin)")
            g.add_argument("--no-chat", action="store_true", help="plain text continuation, no chat template")
        g.add_argument("--system", help="system message")
        g.add_argument("--max-new-tokens", type=int, default=256 if name == "generate" else 512)
        g.add_argument("--temperature", type=float, default=0.0 if name == "generate" else 0.7, help="0 = greedy")
        g.add_argument("--top-p", type=float, default=1.0 if name == "generate" else 0.9)
        g.add_argument("--top-k", type=int, default=None)
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--backend", default="auto", choices=list(BACKENDS),
                       help="matmul of packed layers: native CPU kernel, triton (CUDA), reference (dequantize), or auto")
        g.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                       help="dtype of activations and unquantized weights (embeddings, norms, lm_head); "
                            "float32 decodes fastest on CPU (bench/results/decode.md)")
        g.add_argument("--engine", default="auto", choices=list(ENGINES),
                       help="decode engine: native (the whole Llama forward in C++), upq (a lean loop over "
                            "transformers' forward), hf (transformers' generate()), or auto (native when it "
                            "can run the model, else upq)")
        g.add_argument("--no-fuse", action="store_true",
                       help="do not run q/k/v and gate/up packed layers as one kernel call each")
        g.add_argument("--cache", default="dynamic", choices=["dynamic", "static"], help="KV cache kind")
        g.add_argument("--device", default="cpu", help="cpu (native kernel) or e.g. cuda (Triton kernel when triton is installed, else reference)")
        _add_common(g)
        g.set_defaults(func=_generate if name == "generate" else _chat)


# `upq quantize` grid flags: RTNStage's or BlockwiseConfig's defaults, by --method
GRID_FIELDS: FieldMap = {"grid": ("grid",), "bits": ("bits",), "group_size": ("group_size",)}
# `upq quantize --method blockwise-ptq` flags -> BlockwiseConfig fields
BLOCKWISE_FIELDS: FieldMap = {
    "samples": ("samples",), "seq_len": ("seq_len",), "epochs": ("epochs",), "batch_size": ("batch_size",),
    "lr_weight": ("lr_weight",), "lr_scale": ("lr_scale",), "train": ("train",), "calib": ("calib_source",),
    "chat_fraction": ("chat_fraction",), "activations": ("activations",), "mixed_precision": ("mixed_precision",),
    "seed": ("seed",), "include": ("include",), "exclude": ("exclude",),
}
# `upq eval` flags -> EvalSettings fields
EVAL_FIELDS: FieldMap = {
    "tasks": ("tasks",), "limit": ("limit",), "shots": ("mmlu_shots",), "batch_size": ("batch_size",), "gen_batch_size": ("gen_batch_size",),
    "ppl_tokens": ("ppl_max_tokens",), "ppl_source": ("ppl_source",), "kl_prompts": ("kl_prompts",),
    "kl_max_new_tokens": ("kl_max_new_tokens",), "max_new_tokens": ("ifeval_max_new_tokens",), "dtype": ("dtype",),
}

# `upq distill` flags -> DistillConfig fields (defaults are read from the dataclass: one home per default)
DISTILL_FIELDS: FieldMap = {
    "student_init": ("student_init",), "int4_dir": ("int4_dir",), "latent_from": ("latent_from",),
    "model": ("model",), "teacher": ("teacher",), "grid": ("grid",), "bits": ("bits",), "group_size": ("group_size",),
    "delta_init": ("delta_init",), "calib_samples": ("calib_samples",), "calib_seq_len": ("calib_seq_len",),
    "train": ("train",), "include": ("include",), "exclude": ("exclude",), "loss": ("loss",), "beta": ("beta",),
    "gamma": ("gamma",), "gamma_batches": ("gamma_batches",), "first_loss": ("first_loss",),
    "first_loss_steps": ("first_loss_steps",), "chunk_tokens": ("chunk_tokens",),
    "data": ("data.kind",), "mix_ratio": ("data.mix_ratio",), "text_source": ("data.text_source",),
    "prompts": ("data.prompts_file",), "no_bundled_prompts": ("!data.bundled_prompts",),
    "no_mask_prompt": ("!data.mask_prompt",), "temperature": ("data.chat.temperature",),
    "top_p": ("data.chat.top_p",), "max_new_tokens": ("data.chat.max_new_tokens",),
    "responses_per_prompt": ("data.chat.responses_per_prompt",), "gen_batch_size": ("data.chat.batch_size",),
    "data_cache": ("data.cache_dir",), "self_instruct": ("data.self_instruct",), "seq_len": ("data.seq_len",),
    "heldout_samples": ("data.heldout_samples",), "tokens": ("tokens",), "steps": ("steps",),
    "batch_size": ("batch_size",), "grad_accum": ("grad_accum",), "lr_weight": ("lr_weight",),
    "lr_scale": ("lr_scale",), "scale_eps": ("scale_eps",), "warmup_steps": ("warmup_steps",),
    "warmup_ratio": ("warmup_ratio",), "min_lr_ratio": ("min_lr_ratio",), "max_grad_norm": ("max_grad_norm",),
    "mixed_precision": ("mixed_precision",), "teacher_dtype": ("teacher_dtype",),
    "gradient_checkpointing": ("gradient_checkpointing",), "block_cache_mib": ("block_cache_mib",),
    "cpu": ("cpu",), "seed": ("seed", "data.chat.seed"),
    "log_every": ("log_every",), "eval_every": ("eval_every",), "save_every": ("save_every",),
    "keep_checkpoints": ("keep_checkpoints",),
}


def _add_distill_flags(d: argparse.ArgumentParser) -> None:
    """The ``upq distill`` flags; each default is DistillConfig's."""
    from .distill.config import TEACHER_DTYPES, DistillConfig
    from .distill.memory import CHECKPOINTING
    from .distill.data import KINDS
    from .distill.losses import LOSSES
    from .distill.student import INITS
    from .ptq.handoff import SCALE_INITS

    opt = field_flag_adder(d, DistillConfig, DISTILL_FIELDS)
    losses = sorted(LOSSES)
    opt("--student-init", choices=list(INITS),
        help="progressive: from the INT4 checkpoint (--from); direct: from the original weights")
    opt("--from", dest="int4_dir", help="stage-1 INT4 checkpoint directory (progressive init)")
    opt("--latent-from", help="work directory of the block stage that wrote --from: start from its latent float weights")
    opt("--model", help="original model (direct init; default: the INT4 checkpoint's source, else bundled)")
    opt("--teacher", help="the frozen teacher (default: --model, or the INT4 checkpoint's recorded source)")
    opt("--grid", choices=sorted(GRIDS))
    opt("--bits", type=int)
    opt("--group-size", help="'channel' (one group per row) or 32/64/128")
    opt("--delta-init", choices=list(SCALE_INITS),
        help="INT2 scale init (docs/int2.md): max|W| per row/group, the checkpoint's own scale, the "
             "weight-MSE-optimal or the output-error-optimal scale on calibration text")
    opt("--calib-samples", type=int, help="calibration sequences of the output-aware hand-off")
    opt("--calib-seq-len", type=int)
    opt("--train", help="what trains, comma-separated: weights, scales, norms (scales alone: scale-only training)")
    opt("--include", action="append", help="regex on module names to quantize (direct init)")
    opt("--exclude", action="append", help="regex on module names to keep in full precision (direct init)")
    opt("--loss", choices=losses)
    opt("--beta", type=float, help="gJSD beta (0 = forward KL, 1 = reverse KL)")
    opt("--gamma", type=float, help="CAKLD gamma (default: estimated from the teacher's top-1 probability)")
    opt("--gamma-batches", type=int, help="teacher batches the CAKLD gamma is estimated on")
    opt("--first-loss", choices=losses, help="loss of the first --first-loss-steps steps (then --loss)")
    opt("--first-loss-steps", type=int)
    opt("--chunk-tokens", type=int, help="tokens per chunk of the full-vocabulary loss")
    opt("--data", choices=list(KINDS))
    opt("--mix-ratio", type=float, help="fraction of chat samples with --data mix")
    opt("--text-source", help="'wiki' (bundled), a .txt/.jsonl file or a HF dataset id")
    opt("--prompts", help="extra chat prompts (.jsonl with 'prompt'/'instruction', or .txt)")
    opt("--no-bundled-prompts", action="store_true", help="use only --prompts")
    opt("--no-mask-prompt", action="store_true", help="also train on prompt tokens of chat samples")
    opt("--temperature", type=float, help="teacher sampling temperature")
    opt("--top-p", type=float)
    opt("--max-new-tokens", type=int, help="teacher response length")
    opt("--responses-per-prompt", type=int)
    opt("--gen-batch-size", type=int)
    opt("--data-cache", help="teacher-response cache directory (default: $UPQ_CACHE/distill-data)")
    opt("--self-instruct", type=int,
        help="add N self-generated instruction/answer pairs to the chat data (see `upq self-instruct`)")
    length = d.add_mutually_exclusive_group(required=True)
    length.add_argument("--tokens", type=int, help="nominal training tokens (sets the number of steps)")
    length.add_argument("--steps", type=int, help="optimizer steps")
    opt("--seq-len", type=int)
    opt("--heldout-samples", type=int)
    opt("--batch-size", type=int, help="sequences per process and micro-step")
    opt("--grad-accum", type=int)
    opt("--lr-weight", type=float)
    opt("--lr-scale", type=float)
    opt("--scale-eps", type=float, help="AdamW eps of the quantizer scales")
    opt("--warmup-steps", type=int, help="default: --warmup-ratio of the steps")
    opt("--warmup-ratio", type=float)
    opt("--min-lr-ratio", type=float)
    opt("--max-grad-norm", type=float, help="0 disables clipping")
    opt("--mixed-precision", choices=list(MIXED_PRECISION),
        help="auto: bf16 autocast on CUDA and on CPUs with AVX512-BF16 or AMX, else fp32")
    opt("--teacher-dtype", choices=list(TEACHER_DTYPES), help="auto: bfloat16 where --mixed-precision auto means bf16")
    opt("--gradient-checkpointing", choices=list(CHECKPOINTING),
        help="recompute in backward to save memory: mlp (decoder MLPs), layers (whole layers), none")
    opt("--block-cache-mib", type=int, help="CPU: MiB of freed large blocks kept for reuse by the native block "
        "cache (0: the default allocator)")
    opt("--cpu", action="store_true", help="train on CPU even if a GPU is present")
    opt("--seed", type=int)
    opt("--eval-every", type=int, help="held-out KL every N steps (0: never)")
    opt("--log-every", type=int)
    opt("--save-every", type=int)
    opt("--keep-checkpoints", type=int, help="training checkpoints kept in the work directory")
    d.add_argument("--out", required=True, help="output checkpoint directory (packed INT2 student)")
    d.add_argument("--work-dir", help="training checkpoints, metrics.jsonl, data cache (default: OUT.work)")
    d.add_argument("--keep-work-dir", action="store_true", help="keep the training checkpoints after success")


def build_parser() -> argparse.ArgumentParser:
    """The ``upq`` argument parser."""
    from .evaluation.runner import EvalSettings
    from .ptq.blockwise import BlockwiseConfig

    parser = argparse.ArgumentParser(prog="upq", description="Quantize instruction-tuned LLMs to real 2-bit models.")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save a packed checkpoint")
    q.add_argument("--model", help="Hugging Face id or local directory (default: bundled SmolLM2-135M-Instruct)")
    q.add_argument("--recipe", help="a shipped recipe name (see `upq recipes`) or a recipe YAML file")
    q.add_argument("--budget", default="cpu", choices=list(BUDGETS), help="recipe budget preset")
    q.add_argument("--set", action="append", metavar="STAGE.KEY=VALUE", help="override a recipe key (repeatable)")
    q.add_argument("--add-stage", action="append", metavar="KIND",
                   help="append a stage to the recipe, e.g. lm-head (pack the output head on 4 bits); repeatable")
    q.add_argument("--method", default="rtn", choices=["rtn", "blockwise-ptq"], help="single method when no --recipe")
    q.add_argument("--grid", choices=sorted(GRIDS), help="default: seq")
    q.add_argument("--bits", type=int, help="default: 2 with --method rtn, 4 with blockwise-ptq")
    q.add_argument("--group-size", help="'channel' (one group per row, the default) or 32/64/128")
    q.add_argument("--include", action="append", help="regex on module names to quantize (repeatable)")
    q.add_argument("--exclude", action="append", help="regex on module names to keep in full precision (default: lm_head)")
    q.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="RTN load dtype")
    q.add_argument("--out", required=True, help="output checkpoint directory")
    p = q.add_argument_group("block-wise PTQ")
    ptq_opt = field_flag_adder(p, BlockwiseConfig, BLOCKWISE_FIELDS)
    ptq_opt("--samples", type=int, help="calibration sequences")
    ptq_opt("--seq-len", type=int)
    ptq_opt("--epochs", type=int)
    ptq_opt("--batch-size", type=int)
    ptq_opt("--lr-weight", type=float)
    ptq_opt("--lr-scale", type=float)
    ptq_opt("--train", help="what trains, comma-separated: weights, scales, norms")
    ptq_opt("--calib", help="'wiki' (bundled), a .txt/.jsonl file or a HF dataset id")
    ptq_opt("--chat-fraction", type=float,
            help="share of calibration rows that are the original model's answers to the bundled training prompts")
    ptq_opt("--activations", choices=["memory", "disk"])
    ptq_opt("--mixed-precision", choices=list(MIXED_PRECISION),
            help="auto: bf16 autocast on CUDA and on CPUs with AVX512-BF16 or AMX, else fp32")
    ptq_opt("--seed", type=int)
    p.add_argument("--work-dir", help="per-block checkpoints for resume (default: OUT.work)")
    p.add_argument("--keep-work-dir", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _add_common(q)
    q.set_defaults(func=_quantize)

    r = sub.add_parser("recipes", help="list the shipped recipes")
    _add_common(r)
    r.set_defaults(func=_recipes)

    e = sub.add_parser("eval", help="evaluate a model: perplexity, KL/agreement to the original, MMLU, IFEval")
    e.add_argument("model", nargs="?", help="upq checkpoint, transformers dir, hub id, or 'bundled'")
    e.add_argument("--reference", help="original model for KL (default: the checkpoint's recorded source model)")
    eval_opt = field_flag_adder(e, EvalSettings, EVAL_FIELDS)
    eval_opt("--tasks", help="comma list of ppl,kl,mmlu,ifeval")
    eval_opt("--limit", type=int, help="deterministic subset size for mmlu / ifeval")
    eval_opt("--shots", type=int, help="MMLU few-shot examples")
    eval_opt("--batch-size", type=int)
    eval_opt("--gen-batch-size", type=int, help="rows decoded together when generating (IFEval answers, KL reference answers)")
    eval_opt("--ppl-tokens", type=int, help="held-out tokens for perplexity")
    eval_opt("--ppl-source", help="'wiki' (bundled held-out split), a .txt/.jsonl file or a HF dataset id")
    eval_opt("--kl-prompts", type=int)
    eval_opt("--kl-max-new-tokens", type=int)
    eval_opt("--max-new-tokens", type=int, help="IFEval generation length")
    eval_opt("--dtype", choices=sorted(DTYPES))
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", help="write the full JSON result here")
    e.add_argument("--compare", nargs="+", metavar="RESULT.json", help="print saved results side by side")
    _add_common(e)
    e.set_defaults(func=_eval)

    le = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks on a model (needs the lm-eval extra)")
    le.add_argument("model", help="upq checkpoint, transformers directory, hub id, or 'bundled'")
    le.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    le.add_argument("--include-path", help="directory of your own lm-eval task YAML files")
    le.add_argument("--num-fewshot", type=int)
    le.add_argument("--limit", type=float, help="examples per task (a fraction if < 1)")
    le.add_argument("--batch-size", default="1", help="an integer or 'auto'")
    le.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    le.add_argument("--out", help="write lm-eval's results dictionary here as JSON")
    _add_common(le)
    le.set_defaults(func=_lm_eval)

    x = sub.add_parser("export", help="export a upq checkpoint for other tools")
    x.add_argument("--format", default="hf", choices=["hf", "gguf"], help="hf: dequantized transformers dir; "
                   "gguf: llama.cpp file (Q2_K/Q4_1 where exact) plus OUT.report.json")
    x.add_argument("--dtype", default="float16", choices=sorted(DTYPES),
                   help="dense dtype (gguf: float16/float32 for embeddings and an untied lm_head)")
    x.add_argument("--tokenizer-pre", help="gguf: llama.cpp pre-tokenizer name (default: guessed, e.g. smollm)")
    x.add_argument("--strict", action="store_true", help="gguf: fail instead of storing a quantized layer as F16")
    x.add_argument("checkpoint")
    x.add_argument("out")
    _add_common(x)
    x.set_defaults(func=_export)

    d = sub.add_parser("distill", help="UPQ stage 2: distillation QAT of an INT2 student against the original model")
    _add_distill_flags(d)
    _add_common(d)
    d.set_defaults(func=_distill)

    si = sub.add_parser("self-instruct", help="have the teacher write instructions and answer them (cached "
                        "distillation data); prints or writes them as JSONL")
    si.add_argument("--count", type=int, required=True, help="instruction/answer pairs wanted")
    si.add_argument("--model", help="teacher: local dir or hub id (default: bundled SmolLM2-135M-Instruct)")
    si.add_argument("--seed", type=int, default=0, help="data seed (the same as `upq distill --seed`)")
    si.add_argument("--out", help="write the pairs here as JSONL (default: print them)")
    si.add_argument("--data-cache", help="cache directory (default: $UPQ_CACHE/distill-data, shared with distill)")
    si.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="teacher dtype (part of the cache key)")
    si.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _add_common(si)
    si.set_defaults(func=_self_instruct)
    _add_generation_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``upq`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_file, quiet=args.quiet)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        get_logger().error("error: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
