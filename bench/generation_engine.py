"""Generation engines on the same prompts and machine: static batches, and continuous batching
over transformers' forward and over the native decoder.

The baseline is what ``upq.generation`` did before continuous batching: prompts sorted by
length, cut into batches of ``--batch-size``, each batch left-padded and run through
``model.generate`` until its longest row stops. Continuous batching keeps ``--batch-size`` rows
busy and refills a row as soon as it stops, through transformers' forward on a slotted cache
(``engine="upq"``) or the native decoder's one C++ call per step (``engine="native"``,
``upq.native_decode``). All decode greedily; the script reports wall time, generated tokens/s
and how many responses are identical to the static engine's::

    flock /tmp/upq-heavy.lock python bench/generation_engine.py --prompts 128 --max-new-tokens 512

Writes ``results/generation_engine.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_tasks import DTYPES, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def static_batches(model, tokenizer, encoded: list[list[int]], batch_size: int, max_new_tokens: int,
                   eos: list[int], pad: int) -> list[list[int]]:
    """Length-sorted static batches through ``model.generate`` (the previous engine)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=pad, use_cache=True)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out: list[list[int] | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].tolist()
        for row, i in enumerate(idx):
            tokens = new[row]
            stop = next((k for k, t in enumerate(tokens) if t in eos), None)
            out[i] = tokens if stop is None else tokens[:stop + 1]
    return out  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128, help="first N IFEval prompts")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = ap.parse_args(argv)

    from upq.evaluation.ifeval import load_ifeval
    from upq.generation import generate_ids, render_prompt
    from upq.interactive import eos_token_ids
    from upq.models import load_model

    model, tokenizer = load_model(None, dtype=DTYPES[args.dtype])
    model.eval()
    prompts = [e.prompt for e in load_ifeval(limit=args.prompts)]
    encoded = [render_prompt(tokenizer, p) for p in prompts]
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    t0 = time.perf_counter()
    static = static_batches(model, tokenizer, encoded, args.batch_size, args.max_new_tokens, eos, pad)
    static_s = time.perf_counter() - t0
    engines = {"static": {"seconds": static_s, "responses": static}}
    for engine in ("upq", "native"):
        t0 = time.perf_counter()
        gens = generate_ids(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, progress=False, engine=engine)
        engines[engine] = {"seconds": time.perf_counter() - t0, "responses": [g.response_ids for g in gens]}
    for row in engines.values():
        row["tokens_per_s"] = sum(len(r) for r in row["responses"]) / row["seconds"]
        row["identical_to_static"] = sum(a == b for a, b in zip(static, row["responses"]))
        row["speedup_vs_static"] = static_s / row["seconds"]
    result = {
        "machine": machine(), "settings": vars(args), "model": "SmolLM2-135M-Instruct (bundled)",
        "prompt_tokens": sum(len(e) for e in encoded),
        "engines": {k: {n: v for n, v in row.items() if n != "responses"} for k, row in engines.items()},
        "native_identical_to_upq": sum(a == b for a, b in zip(engines["upq"]["responses"], engines["native"]["responses"])),
    }
    m = result["machine"]
    labels = {"static": "static length-sorted batches (`model.generate`, the first engine)",
              "upq": "continuous batching, transformers' forward (`engine=\"upq\"`)",
              "native": "continuous batching, native decoder (`engine=\"native\"`, the default)"}
    md = "\n".join([
        "# Generation engines (bench/generation_engine.py)", "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}; bundled "
        f"SmolLM2-135M-Instruct in {args.dtype}; the first {args.prompts} IFEval prompts with the chat template, "
        f"greedy, up to {args.max_new_tokens} new tokens, {args.batch_size} rows at a time; one run, idle machine.", "",
        "| engine | seconds | generated tokens/s | vs static | responses identical to static |", "|---|---:|---:|---:|---:|",
        *[f"| {labels[k]} | {row['seconds']:.0f} | {row['tokens_per_s']:.0f} | x{row['speedup_vs_static']:.2f} | "
          f"{row['identical_to_static']} / {args.prompts} |" for k, row in result["engines"].items()],
        "", f"The two continuous engines give {result['native_identical_to_upq']} of {args.prompts} token-for-token "
        "identical responses. Static batches left-pad, so their float rounding differs and greedy picks can flip "
        "on near-ties.", ""])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation_engine.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "generation_engine.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
