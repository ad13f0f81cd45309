"""The README's Python API example runs as written (on the bundled model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    """The first ```python block after the '## Python API' heading."""
    section = README.read_text().split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no Python example under '## Python API'"
    return match.group(1)


@pytest.mark.real_model
def test_readme_python_example_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(python_example(), str(README), "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    print(printed[:300])
    ppl = float(re.search(r"perplexity ([0-9.]+)", printed).group(1))
    answer = printed.split("\n")[1]
    assert re.search(r"[A-Za-z]{3}", answer), printed  # the INT4 model answers in words
    assert 10 < ppl < 100, printed
    out = tmp_path / "out" / "py-int4"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["method"], qc["bits"], qc["group_size"]) == ("rtn-int4", 4, 64)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    recorded = json.loads((out / "upq_eval.json").read_text())["metrics"]["ppl"]["ppl"]
    assert abs(recorded - ppl) < 0.01 and f"| {recorded:.3f} |" in card
    assert (tmp_path / "out" / "py-int4.gguf").stat().st_size > 10 * 2**20
