"""How far the original model in bf16 is from the same model in fp32: the error a bf16 teacher adds.

The distillation stage reads its teacher in bf16 wherever the device multiplies bf16 natively
(``teacher_dtype="auto"``). This measures that teacher against the fp32 original on the fp32
original's greedy answers to the 32 eval chat prompts: KL(fp32 || bf16) per response token and
top-1 agreement, beside the same figures for an INT2 model (``--student``) for scale.

    python bench/bf16_fidelity.py --student runs/compare-cpu/upq --name bf16_fidelity
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from upq.atomic import write_json_atomic, write_text_atomic
from upq.loading import load_any
from upq.data.prompts import load_prompts
from upq.precision import native_bf16
from upq.evaluation.agreement import build_reference, kl_and_agreement
from upq.evaluation.runner import machine
from upq.models import BUNDLED_MODEL, load_model

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="a upq checkpoint scored against the same fp32 reference, for scale")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--name", default="bf16_fidelity")
    args = parser.parse_args()

    fp32, tokenizer = load_model(BUNDLED_MODEL, dtype=torch.float32)
    reference = build_reference(fp32, tokenizer, load_prompts("eval"), max_new_tokens=args.max_new_tokens)
    rows = {"original, bf16 weights and activations": load_model(BUNDLED_MODEL, dtype=torch.bfloat16)[0]}
    if args.student:
        rows[f"INT2 `{args.student}` (fp32)"] = load_any(args.student, dtype=torch.float32)[0]
    results = {label: kl_and_agreement(model, fp32, reference) for label, model in rows.items()}

    student_flag = f" --student {args.student}" if args.student else ""
    command = f"python bench/bf16_fidelity.py{student_flag} --name {args.name}"
    report = {"benchmark": args.name, "model": "SmolLM2-135M-Instruct (bundled)", "machine": machine(),
              "native_bf16": native_bf16(torch.device("cpu")), "reference_tokens": reference.tokens,
              "rows": results, "command": command}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / f"{args.name}.json", report)
    m = report["machine"]
    lines = [f"# A bf16 teacher against the fp32 original: SmolLM2-135M-Instruct on {m['cpu']} ({m['cores']} cores)", "",
             f"KL(fp32 original || model) per token and top-1 agreement on the fp32 original's greedy answers "
             f"({args.max_new_tokens} new tokens) to the 32 eval chat prompts, {reference.tokens} response tokens. "
             f"`{command}`.", "", "| model | KL | top-1 |", "|---|---:|---:|"]
    lines += [f"| {label} | {r['kl']:.5f} | {r['top1_agreement']:.3f} |" for label, r in results.items()]
    write_text_atomic(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
