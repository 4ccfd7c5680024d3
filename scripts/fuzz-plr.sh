#!/usr/bin/env bash
# Random power-loss exploration over every scenario, within a total time budget.
#   scripts/fuzz-plr.sh 10m            (or: just fuzz-plr 10m)
# Each scenario gets an equal share of the budget. The seed is PLR_SEED, or today's date, and
# is printed, so a night's run can be repeated. Failing probes are kept, one reproduction line
# each, in out/plr-failures/<scenario>.txt; the exit status is 1 if there is any.
set -euo pipefail
cd "$(dirname "$0")/.."
budget="${1:-10m}"
seed="${PLR_SEED:-$(date -u +%Y%m%d)}"
case "$budget" in
  *h) total=$(( ${budget%h} * 3600 ));;
  *m) total=$(( ${budget%m} * 60 ));;
  *s) total=${budget%s};;
  *) echo "budget must look like 90s, 10m or 2h" >&2; exit 2;;
esac
cargo build --release -q -p otarig
mapfile -t files < <(ls scenarios/*.toml scenarios/attacks/*.toml)
share=$(( total / ${#files[@]} ))
[ "$share" -ge 1 ] || share=1
out=out/plr-failures
rm -rf "$out"; mkdir -p "$out"
echo "power-loss fuzzing: ${#files[@]} scenarios, ${share}s each, seed $seed"
failed=0
for f in "${files[@]}"; do
  name=$(basename "$f" .toml)
  if ! ./target/release/otarig plr "$f" --random --budget "${share}s" --seed "$seed" \
      --failures "$out/$name.txt" > "$out/$name.log" 2>&1; then
    failed=1
    echo "FAIL  $name  (reproductions in $out/$name.txt)"
  else
    echo "ok    $name  $(grep -E '^cut points' "$out/$name.log" | sed 's/cut points *//')"
  fi
done
exit $failed
