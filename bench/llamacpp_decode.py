"""Batch-1 decode in llama.cpp: upq's GGUF exports against llama.cpp's own Q8_0 and Q4_K_M.

All files hold the bundled SmolLM2-135M-Instruct:
- ``f32``: the original, exported dense by ``upq export --format gguf`` (the quantizer's source);
- ``q8_0`` and ``q4_k_m``: llama.cpp's own quantizations of that file (``llama_model_quantize``);
- ``upq-int4`` and ``upq-int2``: upq RTN SEQ per-channel checkpoints exported to GGUF (speed and
  size do not depend on how the codes were trained; the export is exact).

Each file runs in a fresh process on the same chat prompt: prefill, then exactly ``--tokens``
greedy tokens (end-of-sequence ignored), best of ``--repeats``. Writes ``results/llamacpp_decode``
``.json`` and ``.md``. Needs ``pip install llama-cpp-python`` (built from source here, ~10 min).

    flock /tmp/upq-heavy.lock python bench/llamacpp_decode.py
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPT = "Write a short story about a robot who learns to paint. Describe the colours it discovers."
VARIANTS = ("f32", "q8_0", "q4_k_m", "upq-int4", "upq-int2", "upq-int2-head4")
# upq RTN checkpoints exported to GGUF: `upq quantize` arguments; -head4 also packs lm_head (asym INT4 g32 -> Q4_1)
UPQ_CHECKPOINTS = {
    "upq-int4": ["--method", "rtn", "--grid", "seq", "--bits", "4", "--group-size", "channel"],
    "upq-int2": ["--method", "rtn", "--grid", "seq", "--bits", "2", "--group-size", "channel"],
    "upq-int2-head4": ["--recipe", "rtn-int2", "--add-stage", "lm-head"],
}


def work_dir() -> Path:
    from upq.assets import cache_dir

    path = cache_dir() / "bench" / "gguf"
    path.mkdir(parents=True, exist_ok=True)
    return path


def llama_quantize(source: Path, out: Path, ftype_name: str) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``) from ``source`` to ``out``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = os.cpu_count() or 1
    tmp = out.with_suffix(".tmp")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({ftype_name}) failed with status {status}")
    os.replace(tmp, out)


def ensure_files(names: list[str]) -> dict[str, Path]:
    """The GGUF files of ``names`` (plus the F32 source), made once and cached."""
    from upq.export_gguf import export_gguf
    from upq.models import local_model_dir

    work = work_dir()
    files = {name: work / f"smollm2-{name}.gguf" for name in dict.fromkeys(["f32", *names])}
    if not files["f32"].is_file():
        export_gguf(local_model_dir(None), files["f32"], dense_type="float32")
    for name, ftype in (("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"), ("q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M")):
        if name in files and not files[name].is_file():
            llama_quantize(files["f32"], files[name], ftype)
    for name, arguments in UPQ_CHECKPOINTS.items():
        if name in files and not files[name].is_file():
            ckpt = work / f"rtn-{name}"
            if not (ckpt / "config.json").is_file():
                subprocess.run([sys.executable, "-m", "upq.cli", "quantize", *arguments, "--out", str(ckpt), "--quiet"],
                               check=True)
            export_gguf(ckpt, files[name])
    return files


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM; ru_maxrss would include the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def child(path: Path, tokens: int, repeats: int, threads: int) -> dict:
    """Decode in this process with llama.cpp and return the measurements."""
    import numpy as np
    from llama_cpp import Llama

    from upq.interactive import encode_chat
    from upq.models import load_tokenizer

    ids = list(encode_chat(load_tokenizer(None), [{"role": "user", "content": PROMPT}]))
    llm = Llama(model_path=str(path), n_ctx=len(ids) + tokens + 8, n_threads=threads, n_threads_batch=threads,
                verbose=False)

    n_vocab = llm.n_vocab()

    def run(n_new: int) -> tuple[float, float, list[int]]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t0
        out: list[int] = []
        t0 = time.perf_counter()
        for _ in range(n_new):
            token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))
            out.append(token)
            llm.eval([token])
        return prefill, time.perf_counter() - t0, out

    run(8)
    runs = [run(tokens) for _ in range(repeats)]
    prefill, decode, out = min(runs, key=lambda r: r[1])
    return {"file": path.name, "file_mib": round(path.stat().st_size / 2**20, 1), "prompt_tokens": len(ids),
            "new_tokens": tokens, "decode_tokens_per_s": round(tokens / decode, 2),
            "decode_tokens_per_s_all": [round(tokens / r[1], 2) for r in runs], "ms_per_token": round(1000 * decode / tokens, 2),
            "prefill_s": round(prefill, 4), "peak_rss_mib": peak_rss_mib(),
            "threads": threads, "first_ids": out[:12], "sample": llm.detokenize(out[:24], special=True).decode("utf-8", "replace")}


def to_markdown(res: dict) -> str:
    rows = res["rows"]
    f32 = rows["f32"]["decode_tokens_per_s"]
    lines = ["# Batch-1 decode in llama.cpp, bundled SmolLM2-135M-Instruct", "",
             f"CPU: **{res['cpu']}**, {res['threads']} threads; llama-cpp-python {res['llama_cpp_python']}. "
             f"Chat prompt of {rows['f32']['prompt_tokens']} tokens, exactly {res['tokens']} greedy new tokens, "
             f"best of {res['repeats']} runs, each file in a fresh process. upq files are exact exports of RTN SEQ "
             "per-channel checkpoints (576-wide rows -> Q4_1, 1536-wide down_proj rows -> Q2_K for INT2; -head4 also packs lm_head, "
             "asym INT4 g32 -> Q4_1).", "",
             "| file | MiB | decode tokens/s | ms/token | vs F32 | prefill s | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['file_mib']} | {r['decode_tokens_per_s']:.1f} | {r['ms_per_token']:.2f} | "
                     f"{r['decode_tokens_per_s'] / f32:.2f}x | {r['prefill_s']:.3f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "llamacpp_decode"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (f32 always runs)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.tokens, args.repeats, args.threads)))
        return
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python (builds llama.cpp, ~10 min)")
    sys.path.insert(0, str(Path(__file__).parent))
    from kernels import cpu_name

    files = ensure_files([v for v in args.variants.split(",") if v])
    rows = {}
    for name, path in files.items():
        proc = subprocess.run([sys.executable, __file__, "--child", str(path), "--tokens", str(args.tokens),
                               "--repeats", str(args.repeats), "--threads", str(args.threads)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, json.dumps(rows[name]), flush=True)
    res = {"cpu": cpu_name(), "threads": args.threads, "llama_cpp_python": llama_cpp.__version__, "tokens": args.tokens,
           "repeats": args.repeats, "prompt": PROMPT, "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
