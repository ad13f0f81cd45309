"""Quote IFEval responses of models side by side, so a reader sees whether a quantized model answers.

    python bench/ifeval_quotes.py --first 5 --out bench/results/ifeval_quotes.md \\
        original=bench/results/ifeval_responses/original_fp32.jsonl.gz \\
        "upq INT2"=bench/results/ifeval_responses/upq-int2-cpu.jsonl.gz

Takes the first N prompts in file order (no selection), truncates each response to ``--chars``.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from upq.atomic import write_text_atomic


def read_responses(path: Path) -> list[dict]:
    """The rows of an IFEval responses file (``.jsonl`` or ``.jsonl.gz``)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="LABEL=RESPONSES")
    parser.add_argument("--first", type=int, default=5)
    parser.add_argument("--chars", type=int, default=700)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runs = []
    for spec in args.models:
        label, _, path = spec.partition("=")
        if not path or not Path(path).is_file():
            parser.error(f"expected LABEL=RESPONSES_FILE with an existing file, got {spec!r}")
        runs.append((label, {r["key"]: r for r in read_responses(Path(path))}))
    keys = list(runs[0][1])[: args.first]  # file order
    lines = [f"# IFEval responses, the first {len(keys)} prompts in file order", "",
             f"Greedy, chat template, 512 new tokens; responses cut at {args.chars} characters. "
             "`strict` = every instruction of the prompt followed (prompt-level strict).", ""]
    for key in keys:
        lines += [f"## Prompt {key}", "", "> " + runs[0][1][key]["prompt"].replace("\n", "\n> "), ""]
        for label, rows in runs:
            row = rows[key]
            text = row["response"]
            cut = text[: args.chars] + (" [...]" if len(text) > args.chars else "")
            strict = "yes" if all(row["follow_strict"]) else "no"
            lines += [f"**{label}** (strict: {strict})", "", "````text", cut, "````", ""]
    write_text_atomic(Path(args.out), "\n".join(lines))


if __name__ == "__main__":
    main()
