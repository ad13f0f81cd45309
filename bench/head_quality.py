"""What packing ``lm_head`` costs in quality: one upq checkpoint, its head on several grids, each evaluated alike.

    flock /tmp/upq-heavy.lock python bench/head_quality.py runs/upq-base --variants asym4-g64,asym4-g32,seq4-g64

Each variant is the ``lm-head`` stage run on the checkpoint (the body is unchanged). Held-out
perplexity (16,384 tokens) and KL / top-1 agreement against the original on the 32 eval chat
prompts, the same settings as ``bench/compare.py``. Writes ``results/head_quality.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import upq
from upq.evaluation.runner import machine

RESULTS = Path(__file__).parent / "results"


def parse_variant(name: str) -> dict:
    """``asym4-g64`` (``-clip``: with the output-aware clip search) -> lm-head stage settings."""
    grid, _, rest = name.partition("-g")
    group, _, clip = rest.partition("-")
    return {"grid": grid.rstrip("0123456789"), "bits": int(grid[len(grid.rstrip("0123456789")):]), "group_size": int(group),
            "clip_search": clip == "clip"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--variants", default="asym4-g64,asym4-g32,seq4-g64")
    parser.add_argument("--work", default="runs/head-quality")
    parser.add_argument("--out", default=str(RESULTS / "head_quality"))
    parser.add_argument("--merge", action="store_true", help="add these rows to an existing result (same checkpoint)")
    args = parser.parse_args()
    settings = {"ppl_max_tokens": 16384, "kl_prompts": 32, "kl_max_new_tokens": 128}
    out = Path(args.out)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if args.merge else []
    done = {r["head"] for r in rows}
    for name in [n for n in ["none", *args.variants.split(",")] if n not in done]:
        if name == "none":
            model_dir = Path(args.checkpoint)
        else:
            recipe = Path(args.work) / f"{name}.yaml"
            recipe.parent.mkdir(parents=True, exist_ok=True)
            stage = {"stage": "lm-head", "start": str(Path(args.checkpoint).resolve()), **parse_variant(name)}
            recipe.write_text(json.dumps({"name": f"head-{name}", "stages": [stage]}))
            model_dir = upq.quantize(recipe=str(recipe), out=Path(args.work) / name)
        result = upq.evaluate(model_dir, tasks=["ppl", "kl"], record=False, **settings)
        m = result["metrics"]
        rows.append({"head": name, "ppl": m["ppl"]["ppl"], "kl": m["kl"]["kl"], "top1": m["kl"]["top1_agreement"],
                     "weights_mib": result["size"]["weights_bytes"] / 2**20})
        print(json.dumps(rows[-1]), flush=True)
    res = {"checkpoint": args.checkpoint, "settings": settings, "machine": machine(), "command": " ".join(sys.argv),
           "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    base = rows[0]
    lines = [f"# Cost of packing lm_head: `{args.checkpoint}`", "",
             f"Command: `python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}`. Machine: {res['machine']['cpu']}, "
             f"{res['machine']['cores']} cores. Perplexity on 16,384 held-out tokens; KL(original ‖ model) and top-1 "
             "agreement on the original's greedy answers to the 32 eval chat prompts. The body is the same in every row.",
             "", "| lm_head | ppl | KL | ΔKL | top-1 | Δtop-1 | weights MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'float (tied to the embedding)' if r['head'] == 'none' else r['head']} | {r['ppl']:.2f} | "
                     f"{r['kl']:.4f} | {r['kl'] - base['kl']:+.4f} | {r['top1']:.3f} | {r['top1'] - base['top1']:+.3f} | "
                     f"{r['weights_mib']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
