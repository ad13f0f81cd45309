#!/usr/bin/env bash
# Main job on the bundled SmolLM2-135M-Instruct: the UPQ recipe at its CPU budget (block-wise PTQ to
# INT4, block-wise INT2 reconstruction, then Distill-QAT to INT2), evaluated next to the original on
# held-out perplexity, KL to the original and top-1 agreement; then one comparison table.
# (Round-to-nearest INT2 and every other recipe: bench/results/compare.md.)
# Each step prints its wall time; $OUT/timings.tsv keeps them (step, seconds).
set -euo pipefail
OUT=${UPQ_OUT:-out}
EVAL=(--tasks ppl,kl --ppl-tokens 16384 --quiet)
mkdir -p "$OUT"
: > "$OUT/timings.tsv"
START=$SECONDS
step() {  # step NAME COMMAND...: run it, print and record its wall time
  local name=$1 t0=$SECONDS
  shift
  echo "== quickstart: $name" >&2
  "$@"
  printf '%s\t%d\n' "$name" $((SECONDS - t0)) >> "$OUT/timings.tsv"
  echo "== quickstart: $name took $((SECONDS - t0)) s (total $((SECONDS - START)) s)" >&2
}
step "eval original" upq eval bundled "${EVAL[@]}" --out "$OUT/fp.json"
step "quantize upq (cpu budget)" upq quantize --recipe upq --budget cpu --out "$OUT/upq-int2" --log-file "$OUT/upq-int2.log"
step "eval upq" upq eval "$OUT/upq-int2" "${EVAL[@]}" --out "$OUT/upq-int2.json"
upq eval --compare "$OUT/fp.json" "$OUT/upq-int2.json"
printf 'total\t%d\n' $((SECONDS - START)) >> "$OUT/timings.tsv"
echo "== quickstart: done in $((SECONDS - START)) s" >&2
