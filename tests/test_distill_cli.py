"""`upq distill` command line: a short run end to end and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill_helpers import one_thread, write_corpus, write_int4  # noqa: F401 (fixture)
from upq.checkpoint import read_quantization_config
from upq.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_distill_progressive(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    int4 = write_int4(tiny_model_dir, tmp_path / "int4")
    corpus = write_corpus(tmp_path / "c.txt")
    code = main(["distill", "--from", str(int4), "--text-source", str(corpus), "--seq-len", "32", "--steps", "3",
                 "--batch-size", "2", "--loss", "gjsd", "--beta", "0.3", "--out", str(tmp_path / "out"), "--quiet",
                 "--eval-every", "3", "--heldout-samples", "2", "--delta-init", "output", "--train", "scales,norms",
                 "--first-loss", "forward_kl", "--first-loss-steps", "1"])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["steps"] == 3 and line["heldout_kl_last"] is not None
    qc = read_quantization_config(tmp_path / "out")
    assert qc["recipe"]["beta"] == 0.3 and qc["bits"] == 2
    assert qc["recipe"]["delta_init"] == "output" and qc["recipe"]["train"] == ["scales", "norms"]
    assert qc["recipe"]["first_loss"] == "forward_kl" and qc["recipe"]["first_loss_steps"] == 1
    work = tmp_path / "out.work"
    assert (work / "metrics.jsonl").is_file() and not list(work.glob("step-*"))  # checkpoints cleaned up


def test_cli_distill_errors(tmp_path: Path, capsys) -> None:
    assert main(["distill", "--steps", "1", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--steps", "1", "--tokens", "5", "--out", str(tmp_path / "o")])


def test_cli_distill_latent_from_a_directory_without_latent_weights_is_one_line(tiny_model_dir: Path, tmp_path: Path,
                                                                                capsys) -> None:
    int4 = write_int4(tiny_model_dir, tmp_path / "int4")
    code = main(["distill", "--from", str(int4), "--latent-from", str(tmp_path), "--steps", "1",
                 "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "not a block-wise PTQ work directory" in err and "Traceback" not in err
