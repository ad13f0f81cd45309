"""`accelerate launch` with 2 CPU processes (gloo DDP) matches 1 process with the same global batch.

Launched offline with flags only (no accelerate config file): ``--multi_gpu --num_processes 2``
starts torch.distributed.run; ``upq distill --cpu`` makes Accelerator pick the MULTI_CPU / gloo
backend. The per-process batch is 1 with 2 processes and 2 with 1 process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distill_helpers import write_corpus, write_int4
from upq.distill.trainer import read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _common(int4: Path, corpus: Path) -> list[str]:
    return ["distill", "--student-init", "progressive", "--from", str(int4), "--data", "text",
            "--text-source", str(corpus), "--seq-len", "32", "--steps", "4", "--grad-accum", "2",
            "--lr-weight", "1e-3", "--lr-scale", "1e-2", "--cpu", "--log-every", "1", "--eval-every", "2",
            "--heldout-samples", "4", "--quiet",
            "--mixed-precision", "no", "--teacher-dtype", "float32"]  # the same numbers on every CPU


def test_two_process_gloo_run_matches_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    int4 = write_int4(tiny_model_dir, tmp_path / "int4")
    corpus = write_corpus(tmp_path / "corpus.txt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_DISABLE_RICH": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "upq.cli"]
    two = subprocess.run(launch + _common(int4, corpus) + ["--batch-size", "1", "--out", str(tmp_path / "o2"),
                                                           "--work-dir", str(tmp_path / "w2")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "upq.cli"] + _common(int4, corpus) +
                         ["--batch-size", "2", "--out", str(tmp_path / "o1"), "--work-dir", str(tmp_path / "w1")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads(two.stdout.strip().splitlines()[-1])["steps"] == 4
    m1, m2 = read_metrics(tmp_path / "w1"), read_metrics(tmp_path / "w2")
    losses1 = [r["loss"] for r in m1 if r["step"] > 0]
    losses2 = [r["loss"] for r in m2 if r["step"] > 0]
    assert len(losses1) == len(losses2) == 4
    assert losses2 == pytest.approx(losses1, rel=1e-4)
    assert [r["loss_tokens"] for r in m2 if r["step"] > 0] == [r["loss_tokens"] for r in m1 if r["step"] > 0]
    kl1 = [r["heldout_kl"] for r in m1 if r.get("heldout_kl") is not None]
    kl2 = [r["heldout_kl"] for r in m2 if r.get("heldout_kl") is not None]
    assert len(kl1) == 3 and kl2 == pytest.approx(kl1, rel=1e-4)
    assert (tmp_path / "o2" / "model.safetensors").is_file()
