"""End-to-end batch-1 decode speed and peak memory of the bundled SmolLM2-135M-Instruct on this CPU.

Variants: the original model in FP32 and bf16; upq RTN INT4 and INT2 checkpoints (SEQ,
per-channel) through the reference path (dequantize then matmul) and the native kernel, with
activations/unquantized weights in bf16 and FP32; a static-KV-cache run; and an *overhead
floor*: the bf16 model with every decoder linear replaced by a stub that returns zeros, i.e. the
time per token that is not decoder matmuls (transformers' Python loop, attention, norms,
embedding and the unquantized ``lm_head``). Same chat prompt, greedy, exactly ``--tokens`` new
tokens. Each variant runs in a fresh subprocess (peak RSS = ru_maxrss). Writes
``results/decode.json`` and ``.md``.

    flock /tmp/upq-heavy.lock python bench/decode.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPT = "Write a short story about a robot who learns to paint. Describe the colours it discovers."

# name: (model, dtype, backend, cache, engine); "upq" engine = upq.interactive's lean decode loop over
# transformers' forward, "native" = the whole forward in C++ (upq.native_decode), "hf" = generate()
VARIANTS = {
    "fp32-native-decoder": ("original", "float32", None, "dynamic", "native"),
    "upq-int2-native-decoder": ("int2", "float32", "native", "dynamic", "native"),
    "upq-int2-head4-native-decoder": ("int2-head4", "float32", "native", "dynamic", "native"),
    "fp32": ("original", "float32", None, "dynamic", "upq"),
    "fp32-hf-generate": ("original", "float32", None, "dynamic", "hf"),
    "bf16": ("original", "bfloat16", None, "dynamic", "upq"),
    "upq-int4-reference": ("int4", "float32", "reference", "dynamic", "upq"),
    "upq-int4-native": ("int4", "float32", "native", "dynamic", "upq"),
    "upq-int2-reference": ("int2", "float32", "reference", "dynamic", "upq"),
    "upq-int2-native": ("int2", "float32", "native", "dynamic", "upq"),
    "upq-int2-native-fused": ("int2", "float32", "native-fused", "dynamic", "upq"),
    "upq-int4-native-fused": ("int4", "float32", "native-fused", "dynamic", "upq"),
    "upq-int2-native-static-cache": ("int2", "float32", "native", "static", "upq"),
    "upq-int2-head4-native-fused": ("int2-head4", "float32", "native-fused", "dynamic", "upq"),
    "upq-int2-native-hf-generate": ("int2", "float32", "native", "dynamic", "hf"),
    "upq-int2-native-bf16": ("int2", "bfloat16", "native", "dynamic", "upq"),
    "upq-int4-native-bf16": ("int4", "bfloat16", "native", "dynamic", "upq"),
    "floor-fp32-free-linears": ("floor", "float32", None, "dynamic", "upq"),
    "floor-bf16-free-linears": ("floor", "bfloat16", None, "dynamic", "upq"),
}
# kind: (cache directory name, `upq quantize` arguments); int2-head4 also packs lm_head (asym INT4 g32)
CHECKPOINTS = {
    "int4": ("smollm2-rtn-seq-w4-channel", ["--method", "rtn", "--grid", "seq", "--bits", "4", "--group-size", "channel"]),
    "int2": ("smollm2-rtn-seq-w2-channel", ["--method", "rtn", "--grid", "seq", "--bits", "2", "--group-size", "channel"]),
    "int2-head4": ("smollm2-rtn-seq-w2-channel-head-asym4-g32", ["--recipe", "rtn-int2", "--add-stage", "lm-head"]),
}


def checkpoint_dir(kind: str) -> Path:
    from upq.assets import cache_dir

    return cache_dir() / "bench" / CHECKPOINTS[kind][0]


def ensure_checkpoints() -> None:
    """Make the RTN checkpoints once (cached under $UPQ_CACHE/bench)."""
    for kind, (_, arguments) in CHECKPOINTS.items():
        out = checkpoint_dir(kind)
        if (out / "config.json").is_file():
            continue
        subprocess.run([sys.executable, "-m", "upq.cli", "quantize", *arguments, "--out", str(out), "--quiet"], check=True)


def current_rss_mib() -> float:
    """Resident set size of this process now (Linux /proc), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def child(name: str, tokens: int, repeats: int) -> dict:
    """Run one variant in this process and return its measurements."""
    import resource

    import torch
    from torch import nn

    from upq.interactive import SamplingSettings, encode_chat, stream_generate
    from upq.loading import load_any
    from upq.modules import PackedLinear, select_linears, set_backend

    kind, dtype_name, backend, cache, engine = VARIANTS[name]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    source = None if kind in ("original", "floor") else str(checkpoint_dir(kind))
    model, tokenizer = load_any(source, dtype=dtype)
    if backend is not None:
        set_backend(model, backend.removesuffix("-fused"))
        if backend.endswith("-fused"):
            from upq.fusion import fuse_siblings

            fuse_siblings(model)
    if kind == "floor":

        class Free(nn.Module):
            def __init__(self, out_features: int) -> None:
                super().__init__()
                self.out_features = out_features

            def forward(self, x):
                return x.new_zeros(*x.shape[:-1], self.out_features)

        for lname, linear in list(select_linears(model)):
            parent_name, _, child_name = lname.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, Free(linear.out_features))
    packed = sum(isinstance(m, PackedLinear) for m in model.modules())
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    ids = encode_chat(tokenizer, [{"role": "user", "content": PROMPT}])
    settings = SamplingSettings(max_new_tokens=tokens, min_new_tokens=tokens, cache=cache)
    warm = SamplingSettings(max_new_tokens=8, min_new_tokens=8, cache=cache)
    stream_generate(model, tokenizer, ids, warm, engine=engine)
    if backend == "reference":
        repeats = 1  # ~3 tokens/s: one run is plenty
    runs = [stream_generate(model, tokenizer, ids, settings, engine=engine)[1] for _ in range(repeats)]
    best = max(runs, key=lambda s: s.decode_tokens_per_s)
    new_ids, _ = stream_generate(model, tokenizer, ids, SamplingSettings(max_new_tokens=24, cache=cache), engine=engine)
    breakdown = native_breakdown(model, ids, tokens) if engine == "native" else None
    return {
        "breakdown_ms_per_token": breakdown,
        "variant": name,
        "model": kind,
        "dtype": dtype_name,
        "backend": backend,
        "cache": cache,
        "engine": engine,
        "packed_layers": packed,
        "weights_mib": round(weight_bytes / 2**20, 1),
        "prompt_tokens": best.prompt_tokens,
        "new_tokens": best.new_tokens,
        "decode_tokens_per_s": round(best.decode_tokens_per_s, 2),
        "decode_tokens_per_s_all": [round(r.decode_tokens_per_s, 2) for r in runs],
        "ms_per_token": round(1000 / best.decode_tokens_per_s, 2),
        "prefill_s": round(best.prefill_s, 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_generate_mib": round(current_rss_mib(), 1),
        "rss_before_load_mib": round(rss_start, 1),
        "sample": tokenizer.decode(new_ids, skip_special_tokens=True)[:120],
        "threads": torch.get_num_threads(),
    }


def native_breakdown(model, ids: list[int], tokens: int) -> dict[str, float]:
    """ms per decoded token in each part of the native forward, and the rest of the loop
    (``overhead``: Python, argmax, the call itself), from one extra greedy run with profiling on."""
    import time

    from upq.native_decode import native_decoder

    decoder = native_decoder(model)
    decoder.reset(1, len(ids) + tokens)
    token = int(decoder.prefill(0, ids).argmax())
    decoder.set_profile(True)
    decoder.take_profile()
    start = time.perf_counter()
    for i in range(tokens - 1):
        token = int(decoder.forward([token], [0], [len(ids) + i], [0])[0].argmax())
    total = (time.perf_counter() - start) * 1000 / (tokens - 1)
    decoder.set_profile(False)
    parts = {k: v * 1000 / (tokens - 1) for k, v in decoder.take_profile().items()}
    parts["overhead"] = total - sum(parts.values())
    return {k: round(v, 3) for k, v in parts.items()}


BREAKDOWN_PARTS = ("linears", "lm_head", "attention", "norms", "mlp_activation", "residual", "embedding", "overhead")


def breakdown_lines(rows: dict) -> list[str]:
    """The per-part table of the native-decoder rows."""
    native = {n: r for n, r in rows.items() if r.get("breakdown_ms_per_token")}
    if not native:
        return []
    lines = ["", "Where a token's time goes in the native decoder (one extra profiled run, ms/token; `linears` = the "
             "packed kernel (dense_gemv for float weights) on the decoder's projections, `attention` includes rotary and the "
             "cache writes, `overhead` = the Python loop, argmax and the call):", "",
             "| variant | " + " | ".join(BREAKDOWN_PARTS) + " | total |", "|---|" + "---:|" * (len(BREAKDOWN_PARTS) + 1)]
    for name, r in native.items():
        b = r["breakdown_ms_per_token"]
        total = sum(b.values())
        cells = [f"{b.get(p, 0.0):.2f} ({100 * b.get(p, 0.0) / total:.0f}%)" for p in BREAKDOWN_PARTS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {total:.2f} |")
    return lines


# our variant -> the llama.cpp file holding the same model
LLAMACPP_TWINS = {"upq-int2-native-decoder": "upq-int2", "upq-int2-head4-native-decoder": "upq-int2-head4",
                  "fp32-native-decoder": "f32"}


def llamacpp_lines(rows: dict, llamacpp: dict | None) -> list[str]:
    """Our native-decoder rows beside llama.cpp running the GGUF export of the same model."""
    if not llamacpp:
        return []
    lines = ["", f"Against llama.cpp on the same machine, run back to back (llama-cpp-python "
             f"{llamacpp['llama_cpp_python']}, same prompt and token count, `llamacpp_decode_native*.json`):", "",
             "| model | upq native decoder tokens/s | llama.cpp tokens/s (same model as GGUF) | ratio |", "|---|---:|---:|---:|"]
    for ours, theirs in LLAMACPP_TWINS.items():
        if ours in rows and theirs in llamacpp["rows"]:
            a, b = rows[ours]["decode_tokens_per_s"], llamacpp["rows"][theirs]["decode_tokens_per_s"]
            lines.append(f"| {theirs} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    return lines


def to_markdown(res: dict) -> str:
    rows = {r["variant"]: r for r in res["rows"]}
    fp32 = rows.get("fp32", {}).get("decode_tokens_per_s")
    bf16 = rows.get("bf16", {}).get("decode_tokens_per_s")
    lines = [
        "# Batch-1 decode, bundled SmolLM2-135M-Instruct (CPU)",
        "",
        f"CPU: **{res['cpu']}**, {res['cores']} cores; torch {res['torch']}, transformers {res['transformers']}. "
        f"Prompt of {next(iter(rows.values()))['prompt_tokens']} tokens (chat template), "
        f"{res['tokens']} new tokens, greedy, best of {res['repeats']} runs; upq checkpoints are RTN SEQ per-channel "
        "(speed does not depend on the method). RSS includes Python, torch and transformers "
        f"(~{next(iter(rows.values()))['rss_before_load_mib']:.0f} MiB before loading); peak RSS also includes "
        "loading transients (the bundled model is stored in FP32 and cast on load), steady RSS is measured "
        "after generating.",
        "",
        "| variant | weights MiB | decode tokens/s | ms/token | vs FP32 | vs bf16 | prefill s | steady RSS MiB | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        t = r["decode_tokens_per_s"]
        lines.append(
            f"| {name} | {r['weights_mib']} | {t:.1f} | {r['ms_per_token']:.1f} | "
            f"{t / fp32:.2f}x | {t / bf16:.2f}x | {r['prefill_s']:.3f} | {r['rss_after_generate_mib']:.0f} | "
            f"{r['peak_rss_mib']:.0f} |"
            if fp32 and bf16 else f"| {name} | {r['weights_mib']} | {t:.1f} | {r['ms_per_token']:.1f} | | | "
            f"{r['prefill_s']:.3f} | {r['rss_after_generate_mib']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    native = rows.get("upq-int2-native-decoder")
    best = native or rows.get("upq-int2-native-fused") or rows.get("upq-int2-native")
    if best and fp32 and bf16:
        t = best["decode_tokens_per_s"]
        lines += ["", f"Targets: upq INT2 ({best['variant']}) vs FP32 {t / fp32:.2f}x (target >= 3x: "
                  f"{'met' if t >= 3 * fp32 else 'missed by ' + format(3 * fp32 / t, '.2f') + 'x'}); "
                  f"vs bf16 {t / bf16:.2f}x (target > 1x: {'met' if t > bf16 else 'missed'})."]
    transformers_int2 = rows.get("upq-int2-native-fused") or rows.get("upq-int2-native")
    floor = rows.get("floor-fp32-free-linears")
    if transformers_int2 and floor and fp32:
        f_ms, b_ms = floor["ms_per_token"], transformers_int2["ms_per_token"]
        lines += ["", f"Overhead floor of the transformers forward: with every decoder linear replaced by a free stub, "
                  f"the FP32 model still needs {f_ms:.1f} ms/token ({floor['decode_tokens_per_s']:.0f} tokens/s): "
                  f"per-token Python and dispatch work, attention, norms, rotary embeddings and the FP32 lm_head "
                  f"(49152 x 576). {transformers_int2['variant']} spends {b_ms:.1f} ms/token on that forward"
                  + (f"; the native decoder runs the same model in {native['ms_per_token']:.1f} ms/token, below the "
                     "transformers floor." if native else ".")]
    head = rows.get("upq-int2-head4-native-fused")
    if head and transformers_int2:
        lines += ["", f"Packed lm_head (the `lm-head` stage, asym INT4 g32, untied from the embedding), transformers "
                  f"forward: {head['decode_tokens_per_s']:.1f} tokens/s against {transformers_int2['decode_tokens_per_s']:.1f} "
                  f"with the float head; what it costs in quality is in `head_quality.md`."]
    lines += breakdown_lines(rows) + llamacpp_lines(rows, res.get("llamacpp"))
    hf, lean = rows.get("upq-int2-native-hf-generate"), rows.get("upq-int2-native")
    if hf and lean:
        lines += ["", f"Decode loop: transformers' generate() costs {hf['ms_per_token'] - lean['ms_per_token']:.1f} "
                  "ms/token more than upq's lean loop (same model and kernel)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "decode"))
    parser.add_argument("--llamacpp", help="llamacpp_decode.py's JSON from a run just before, shown beside ours")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.repeats)))
        return
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).parent))
    from kernels import cpu_name

    ensure_checkpoints()
    rows = []
    for name in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--tokens", str(args.tokens),
                               "--repeats", str(args.repeats)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"variant {name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    res = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
           "transformers": transformers.__version__, "tokens": args.tokens, "repeats": args.repeats,
           "prompt": PROMPT, "rows": rows,
           "llamacpp": json.loads(Path(args.llamacpp).read_text()) if args.llamacpp else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
