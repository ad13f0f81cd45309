"""Does llama.cpp compute the same model as upq? Logits of a GGUF export vs the upq checkpoint.

Loads ``OUT.gguf`` (written by ``upq export --format gguf`` from CHECKPOINT; exported first if it
is missing) in llama-cpp-python, runs a few fixed chat prompts token by token with all logits
kept, and compares with upq's own model on the same token ids: max |logit diff|, KL(upq || gguf)
per position and greedy top-1 agreement. Also checks that llama.cpp's tokenizer gives the same
ids as the checkpoint's tokenizer. Writes ``results/gguf_llamacpp.json`` (or ``--out``).

llama-cpp-python is *not* a upq dependency and is not installed by this script (building it is a
long CPU-heavy compile): ``pip install llama-cpp-python`` first. Without it the script says so and
exits with status 2; ``--transformers-fallback`` then compares with transformers' GGUF loader
instead, which checks the file (names, permutation, dequantization) but not llama.cpp's kernels.

    python bench/gguf_llamacpp.py /tmp/int2 /tmp/int2.gguf --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than ten.",
]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a one-turn chat with the generation prompt."""
    from upq.interactive import encode_chat

    return list(encode_chat(tokenizer, [{"role": "user", "content": prompt}]))


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Max |diff|, mean/max KL(ours || theirs) per position and top-1 agreement of (T, V) logits."""
    ours, theirs = ours.double(), theirs.double()
    logp, logq = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {"positions": ours.shape[0], "max_abs_logit_diff": float((ours - theirs).abs().max()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).double().mean())}


def llamacpp_logits(gguf_path: Path, threads: int, n_ctx: int):
    """A function ids -> (T, V) logits from llama.cpp, and one text -> ids; None if not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, logits_all=True, verbose=False)

    def logits(ids: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(llm.scores[: len(ids)].copy())

    def tokenize(text: str) -> list[int]:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    return logits, tokenize


def transformers_logits(gguf_path: Path):
    """Fallback: transformers' GGUF loader (dequantizes with the gguf package)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()

    def logits(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0]

    return logits, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="upq checkpoint directory (Llama architecture)")
    parser.add_argument("gguf", help="GGUF file; exported from the checkpoint if missing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--transformers-fallback", action="store_true",
                        help="without llama-cpp-python, compare with transformers' GGUF loader instead")
    parser.add_argument("--out", default=str(RESULTS / "gguf_llamacpp.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from upq.atomic import write_json_atomic
    from upq.export_gguf import export_gguf
    from upq.loading import load_any

    gguf_path = Path(args.gguf)
    if not gguf_path.is_file():
        print(export_gguf(args.checkpoint, gguf_path).table().splitlines()[-1])
    engine = "llama.cpp"
    backend = llamacpp_logits(gguf_path, args.threads, args.n_ctx)
    if backend is None:
        print("llama-cpp-python is not installed (import llama_cpp failed); install it with "
              "`pip install llama-cpp-python` to compare against llama.cpp.", file=sys.stderr)
        if not args.transformers_fallback:
            return 2
        engine, backend = "transformers-gguf", transformers_logits(gguf_path)
    their_logits, their_tokenize = backend
    model, tokenizer = load_any(args.checkpoint)
    rows = []
    for prompt in PROMPTS:
        ids = chat_ids(tokenizer, prompt)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0]
        row = {"prompt": prompt, **compare(ours, their_logits(ids))}
        if their_tokenize is not None:
            text = tokenizer.decode(ids)
            row["same_token_ids"] = their_tokenize(text) == ids
        rows.append(row)
        print(json.dumps(row))
    summary = {"engine": engine, "checkpoint": args.checkpoint, "gguf": str(gguf_path),
               "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
               "kl_mean": sum(r["kl_mean"] for r in rows) / len(rows),
               "top1_agreement": sum(r["top1_agreement"] * r["positions"] for r in rows) / sum(r["positions"] for r in rows),
               "prompts": rows}
    write_json_atomic(args.out, summary)
    print(f"{engine}: max |logit diff| {summary['max_abs_logit_diff']:.3g}, mean KL {summary['kl_mean']:.3g}, "
          f"top-1 agreement {summary['top1_agreement']:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
