"""Short runs that chose the `upq` recipe's INT2 start, each evaluated on the 32 eval chat prompts (KL only).

Three kinds of run on the bundled SmolLM2-135M-Instruct, all starting from a block-wise PTQ SEQ
INT4 g64 checkpoint (``upq quantize --recipe ptq-int4 --budget cpu --set ptq.group_size=64``):

    python bench/int2_start_sweep.py handoff INT4_DIR max,int4,mse,output      # untrained INT2 starts
    python bench/int2_start_sweep.py blocks INT4_DIR TAG '{"epochs": 4, ...}'  # the INT2 block stage
    python bench/int2_start_sweep.py blocks --recipe upq INT4_DIR TAG '{"mixed_precision": "no"}'  # a recipe's, changed
    python bench/int2_start_sweep.py distill START_DIR TAG KEY=VALUE ...       # upq-paper's distill stage
    python bench/int2_start_sweep.py distill --recipe upq START_DIR TAG distill.latent_from=BLOCKS_WORK  # options first

Each prints one JSON line (KL, top-1, per-block errors or the trainer's held-out KL curve);
``bench/results/int2_start_sweep.md`` collects them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from upq.checkpoint import save_quantized
from upq.distill.student import Calibration, build_student
from upq.distill.trainer import distill, read_metrics
from upq.evaluation.runner import EvalSettings, evaluate
from upq.grids import GridSpec
from upq.models import BUNDLED_MODEL
from upq.modules import pack_model
from upq.ptq.blockwise import Int2BlocksConfig, blockwise_ptq
from upq.recipes.schema import load_recipe


def kl_of(path: Path) -> dict:
    """KL and top-1 agreement on the 32 eval chat prompts."""
    m = evaluate(str(path), None, EvalSettings(tasks=("kl",)))["metrics"]["kl"]
    return {"kl": m["kl"], "top1": m["top1_agreement"]}


def handoff(args: argparse.Namespace) -> None:
    for init in args.inits.split(","):
        student = build_student("progressive", int4_dir=args.start, spec=GridSpec("seq", 2, 64), delta_init=init,
                                calibration=Calibration(16, 256))
        pack_model(student.model)
        out = Path(args.work) / f"handoff-{init}"
        save_quantized(student.model, out, student.tokenizer, method="int2-start", extra={"source_model": BUNDLED_MODEL})
        print(json.dumps({"run": "handoff", "delta_init": init, **kl_of(out)}), flush=True)


def blocks(args: argparse.Namespace) -> None:
    settings = json.loads(args.settings)
    if args.recipe:  # the recipe's INT2 block stage (cpu budget), with ``settings`` changed
        base = next(s.config for s in load_recipe(args.recipe, "cpu").stages if s.kind == "int2-blocks")
        cfg = dataclasses.replace(base, init_from=args.start, **settings)
    else:
        cfg = Int2BlocksConfig(init_from=args.start, **settings)
    started = time.perf_counter()
    model, tokenizer, results = blockwise_ptq(None, cfg, Path(args.work) / f"blocks-{args.tag}.work")
    out = Path(args.work) / f"blocks-{args.tag}"
    save_quantized(model, out, tokenizer, method="int2-blocks", extra={"source_model": BUNDLED_MODEL})
    print(json.dumps({"run": "blocks", "tag": args.tag, **settings, **kl_of(out),
                      "seconds": round(time.perf_counter() - started),
                      "blocks": [(b.index, round(b.mse_before, 4), round(b.mse_after, 4)) for b in results]}), flush=True)


def distill_run(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, "cpu", ["distill.group_size=64", "distill.eval_every=5", *args.overrides])
    cfg = next(s.config for s in recipe.stages if s.kind == "distill")
    cfg = dataclasses.replace(cfg, int4_dir=args.start)
    out, work = Path(args.work) / f"distill-{args.tag}", Path(args.work) / f"distill-{args.tag}.work"
    distill(cfg, out, work)
    curve = [(r["step"], r["heldout_kl"]) for r in read_metrics(work) if r.get("heldout_kl") is not None]
    print(json.dumps({"run": "distill", "tag": args.tag, "overrides": args.overrides, **kl_of(out),
                      "heldout_kl_curve": curve}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/int2-start")
    sub = parser.add_subparsers(required=True)
    h = sub.add_parser("handoff")
    h.add_argument("start")
    h.add_argument("inits")
    h.set_defaults(func=handoff)
    b = sub.add_parser("blocks")
    b.add_argument("start")
    b.add_argument("tag")
    b.add_argument("settings", help="Int2BlocksConfig fields as JSON")
    b.add_argument("--recipe", help="start from this recipe's int2-blocks stage (cpu budget) instead of the defaults")
    b.set_defaults(func=blocks)
    d = sub.add_parser("distill")
    d.add_argument("start")
    d.add_argument("tag")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--recipe", default="upq-paper", help="whose distill stage (upq-paper, upq)")
    d.set_defaults(func=distill_run)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
