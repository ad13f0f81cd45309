"""Quantize the bundled model several ways and measure each on held-out data.

Rows are ``fp`` or ``METHOD:GRID:BITS:GROUP`` with METHOD in {rtn, ptq} (ptq = block-wise PTQ),
e.g. ``rtn:seq:2:channel``. Each row reports held-out perplexity, KL(original || row) and top-1
agreement on the original model's greedy chat responses, the on-disk bytes of the decoder
linears against their FP16 size, and wall times. Writes ``results/NAME.json`` and ``.md``.

    python bench/quality.py --name rtn --rows fp,rtn:seq:2:channel,rtn:asym:2:128
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from safetensors import safe_open

from upq.atomic import write_json_atomic, write_text_atomic
from upq.checkpoint import WEIGHTS_NAME, save_quantized
from upq.evaluation.runner import EvalSettings, evaluate, machine
from upq.grids import GridSpec, parse_group_size
from upq.models import load_model
from upq.packing import storage_bits
from upq.ptq.blockwise import BlockwiseConfig, blockwise_ptq
from upq.ptq.rtn import rtn_quantize

RESULTS = Path(__file__).parent / "results"


def linear_bytes(checkpoint: Path) -> dict[str, float]:
    """On-disk bytes of the quantized linears vs the FP16 bytes of the same weights."""
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    modules = set(config["modules"])
    packed = fp16 = 0
    with safe_open(checkpoint / WEIGHTS_NAME, "pt") as f:
        for key in f.keys():
            module, _, leaf = key.rpartition(".")
            if module in modules:
                t = f.get_slice(key)
                shape = t.get_shape()
                n = 1
                for d in shape:
                    n *= d
                packed += n * {"U8": 1, "F16": 2, "BF16": 2, "F32": 4}[t.get_dtype()]
                if leaf == "qweight":
                    spec = config["modules"][module]
                    fp16 += shape[0] * shape[1] * (8 // storage_bits(spec["bits"])) * 2
    return {"linear_bytes": packed, "linear_fp16_bytes": fp16, "ratio_vs_fp16": packed / fp16}


def build_row(row: str, out: Path, ptq: dict) -> dict:
    """Quantize one row into ``out``; return its build record."""
    method, grid, bits, group = row.split(":")
    spec = GridSpec(grid, int(bits), parse_group_size(group))
    start = time.perf_counter()
    if method == "rtn":
        model, tokenizer = load_model(None)
        rtn_quantize(model, spec)
        extra = {}
    elif method == "ptq":
        cfg = BlockwiseConfig(grid=spec.grid, bits=spec.bits, group_size=spec.group_size, **ptq)
        model, tokenizer, blocks = blockwise_ptq(None, cfg, out.with_suffix(".work"))
        extra = {"blocks": [b.__dict__ for b in blocks]}
    else:
        raise ValueError(f"unknown method in row {row!r}")
    seconds = time.perf_counter() - start
    save_quantized(model, out, tokenizer, method=method, extra={"source_model": "smollm2-135m-instruct", **extra})
    shutil.rmtree(out.with_suffix(".work"), ignore_errors=True)
    return {"quantize_seconds": round(seconds, 1), **linear_bytes(out), **({"blocks": extra["blocks"]} if extra else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--workdir", default="/tmp/upq-bench")
    parser.add_argument("--ppl-tokens", type=int, default=32768)
    parser.add_argument("--kl-prompts", type=int, default=32)
    parser.add_argument("--ptq-samples", type=int, default=128)
    parser.add_argument("--ptq-seq-len", type=int, default=512)
    parser.add_argument("--ptq-epochs", type=int, default=2)
    parser.add_argument("--ptq-lr-weight", type=float, default=1e-4)
    parser.add_argument("--ptq-lr-scale", type=float, default=1e-3)
    args = parser.parse_args()
    ptq = {"samples": args.ptq_samples, "seq_len": args.ptq_seq_len, "epochs": args.ptq_epochs,
           "lr_weight": args.ptq_lr_weight, "lr_scale": args.ptq_lr_scale}
    settings = EvalSettings(tasks=("ppl", "kl"), ppl_max_tokens=args.ppl_tokens, kl_prompts=args.kl_prompts)
    previous = RESULTS / f"{args.name}.json"
    done = {}
    if previous.is_file():  # rows measured by an earlier, interrupted run with the same settings are kept
        old = json.loads(previous.read_text())
        if old.get("eval_settings") == json.loads(json.dumps(settings.__dict__)):
            same_ptq = old.get("ptq_settings") == ptq
            done = {r["row"]: r for r in old["rows"] if same_ptq or not r["row"].startswith("ptq:")}
    rows = []
    for row in args.rows.split(","):
        if row in done:
            rows.append(done[row])
            continue
        out = Path(args.workdir) / row.replace(":", "-")
        build = {} if row == "fp" else build_row(row, out, ptq)
        result = evaluate(None if row == "fp" else str(out), None, settings)
        m = result["metrics"]
        rows.append({"row": row, "ppl": m["ppl"]["ppl"], "kl": m["kl"]["kl"], "top1": m["kl"]["top1_agreement"],
                     "eval_seconds": result["timings_s"]["total"], **build})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "blocks"}), flush=True)
        report = {"benchmark": args.name, "model": "SmolLM2-135M-Instruct (bundled)", "machine": machine(),
                  "eval_settings": settings.__dict__, "ptq_settings": ptq, "rows": rows}
        write_json_atomic(previous, report)
    lines = [f"# {args.name}: SmolLM2-135M-Instruct on {report['machine']['cpu']} ({report['machine']['cores']} cores)", "",
             f"Held-out perplexity on {args.ppl_tokens} wiki tokens; KL(original||row) and top-1 agreement on the "
             f"original's greedy responses to {args.kl_prompts} held-out chat prompts.", "",
             "| row | ppl | KL | top-1 | linears MiB | vs FP16 | quantize s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mib = f"{r['linear_bytes'] / 2**20:.1f}" if "linear_bytes" in r else "-"
        ratio = f"{r['ratio_vs_fp16']:.3f}" if "ratio_vs_fp16" in r else "1"
        lines.append(f"| {r['row']} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.3f} | {mib} | {ratio} | {r.get('quantize_seconds', '-')} |")
    write_text_atomic(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
