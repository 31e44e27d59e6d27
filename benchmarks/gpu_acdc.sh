#!/usr/bin/env bash
# The paper's ACDC protocol on one GPU. First what DACL costs there (benchmarks/step_cost.py on
# the paper preset: 256x256, batch 12 + 12; CPS, DACL and DACL's old default side by side, the
# objective alone against the step; about a minute; COST=0 skips it), then supervised, CPS
# and DACL trained side by side on one device (bf16, 7 labeled patients, seed 0), then the
# collected table. Sized for one H200 within about 9 minutes: the paper trains 30,000 steps,
# this runs STEPS of them (default 3000, an estimate not yet measured on the device: lower it
# if the first run's step rate says so). Everything it writes lands in OUT.
#
#   python benchmarks/pack_acdc.py pack --out .devdata      # once, here: .devdata/acdc_pack.npz.xz (~53 MiB)
#   bash benchmarks/gpu_acdc.sh                              # on the device (carry .devdata)
#
# Environment: STEPS (3000), OUT (runs/gpu_acdc, or $OUT/gpu_acdc where the device tool sets
# OUT), PACK (.devdata/acdc_pack.npz.xz), DEVICE (cuda), SEED (0), EXTRA (more flags for every
# run, e.g. a smaller --size for a CPU check; tests/test_gpu_script.py runs it for 2 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-3000}
OUT=${OUT:+$OUT/gpu_acdc}
OUT=${OUT:-runs/gpu_acdc}
PACK=${PACK:-.devdata/acdc_pack.npz.xz}
DEVICE=${DEVICE:-cuda}
SEED=${SEED:-0}
EXTRA=${EXTRA:-}
DATA=$(mktemp -d)
mkdir -p "$OUT"
start=$(date +%s)
python benchmarks/pack_acdc.py unpack "$PACK" --out "$DATA"
if [ "${COST:-1}" != "0" ]; then
  python benchmarks/step_cost.py --preset paper --device "$DEVICE" --data-root "$DATA" --steps "${COST_STEPS:-10}" \
    --rounds 2 --warmup 3 --profile-steps 0 --output "$OUT/step_cost_paper_gpu.json" --example-args "$EXTRA" \
    --variants cps dacl "dacl, old default (dense heads, 1024 samples/class)" \
    > "$OUT/step_cost.log" 2>&1 || { tail -n 30 "$OUT/step_cost.log"; echo "step_cost failed"; exit 1; }
  grep "^|" "$OUT/step_cost.log" || true
fi
pids=()
for method in sup cps dacl; do
  # shellcheck disable=SC2086
  python examples/acdc_cps_dacl.py --preset paper --method "$method" --labeled 7 --seed "$SEED" \
    --steps "$STEPS" --val-every $(( STEPS / 5 > 0 ? STEPS / 5 : 1 )) --device "$DEVICE" --data-root "$DATA" \
    --output-dir "$OUT/acdc_paper_${method}_p7_seed${SEED}" --overwrite --no-progress $EXTRA \
    > "$OUT/${method}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
tail -n 12 "$OUT"/*.log
[ "$status" -eq 0 ] || { echo "a run failed (see $OUT/*.log)"; exit 1; }
python benchmarks/collect.py acdc --collect-only --preset paper --variants sup cps dacl --seeds "$SEED" --labeled 7 \
  --runs "$OUT" --results "$OUT" || echo "collect.py could not tabulate the runs (see above)"
echo "gpu_acdc took $(( $(date +%s) - start )) s for $STEPS steps"
