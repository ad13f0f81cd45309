"""Peak memory of block-wise PTQ vs model depth: same width, 4 vs 16 decoder blocks.

Each configuration runs in a fresh subprocess; the peak resident set size (ru_maxrss) of that
process is reported, together with the size the FP32 weights would take if fully loaded.
Writes ``results/ptq_memory.json`` and ``.md``.

    python bench/ptq_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
WIDTH = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 16}

CHILD = r"""
import json, resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from upq.models import load_tokenizer
from upq.ptq.blockwise import BlockwiseConfig, blockwise_ptq
layers, root = int(sys.argv[1]), sys.argv[2]
width = json.loads(sys.argv[3])
tok = load_tokenizer(None)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), num_hidden_layers=layers, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True, **width)
model = LlamaForCausalLM(cfg)
weights_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
model.save_pretrained(f"{root}/model"); tok.save_pretrained(f"{root}/model")
del model
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
ptq = BlockwiseConfig(bits=4, samples=16, seq_len=256, epochs=1, batch_size=4)
_, _, blocks = blockwise_ptq(f"{root}/model", ptq, f"{root}/work")
print(json.dumps({"layers": layers, "fp32_weights_mib": round(weights_mib, 1),
                  "rss_before_ptq_mib": round(base, 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "block_peaks_mib": [b.peak_rss_mib for b in blocks],
                  "seconds": round(sum(b.seconds for b in blocks), 1)}))
"""


def measure(layers: int) -> dict:
    """Run block-wise PTQ on a fresh ``layers``-deep model in a subprocess."""
    with tempfile.TemporaryDirectory() as root:
        # the model is built and saved in a separate process so its memory does not count
        build = CHILD.split("base = ")[0] + "print('built')"
        subprocess.run([sys.executable, "-c", build, str(layers), root, json.dumps(WIDTH)], check=True,
                       capture_output=True)
        run = CHILD.replace("model = LlamaForCausalLM(cfg)", "model = None").replace(
            "weights_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20", "weights_mib = 0").replace(
            'model.save_pretrained(f"{root}/model"); tok.save_pretrained(f"{root}/model")', "")
        out = subprocess.run([sys.executable, "-c", run, str(layers), root, json.dumps(WIDTH)], check=True,
                             capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        weights = sum(p.stat().st_size for p in Path(root, "model").glob("*.safetensors")) / 2**20
        result["fp32_weights_mib"] = round(weights, 1)
        return result


def main() -> None:
    from upq.evaluation.runner import machine
    from upq.atomic import write_json_atomic, write_text_atomic

    rows = [measure(n) for n in (4, 16)]
    ratio = rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    report = {"benchmark": "ptq_memory", "machine": machine(), "width": WIDTH,
              "ptq": {"bits": 4, "grid": "seq", "group_size": None, "samples": 16, "seq_len": 256, "epochs": 1},
              "rows": rows, "peak_ratio_16_vs_4": round(ratio, 3)}
    write_json_atomic(RESULTS / "ptq_memory.json", report)
    lines = [f"# Block-wise PTQ peak memory vs depth ({machine()['cpu']}, {machine()['cores']} cores)", "",
             "Same width (hidden 1024, MLP 2816, vocab 49152, tied embeddings), SEQ INT4 per-channel, "
             "16 x 256 calibration tokens, 1 epoch. Peak RSS of the whole process.", "",
             "| blocks | FP32 weights on disk MiB | peak RSS MiB | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['layers']} | {r['fp32_weights_mib']} | {r['peak_rss_mib']} | {r['seconds']} |" for r in rows]
    lines += ["", f"Peak ratio 16 vs 4 blocks: {ratio:.3f} (target: within 1.20)."]
    write_text_atomic(RESULTS / "ptq_memory.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
