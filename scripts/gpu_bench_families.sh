#!/usr/bin/env bash
# The four families' 8B presets on one GPU (random bf16 weights, published shapes:
# moa_jax/bench/random_model.py): decode throughput of MoA against the dense kernel, and the
# profile stage of the plan search. Two stages, one device call each (each fits ~9 minutes
# on one H100 80GB):
#
#   OUT=/some/dir scripts/gpu_bench_families.sh decode    # ~4-5 min
#   OUT=/some/dir scripts/gpu_bench_families.sh profile   # ~6-7.5 min
#   OUT=/some/dir scripts/gpu_bench_families.sh profile qwen3-8b   # some presets only
#
# decode:  python -m moa_jax.bench.decode per preset: MoA with the synthetic plan at KV
#          density 0.5 (cache 0.5 of dense) and the dense decode kernel, context 32768, each at
#          the largest batch its caches fit (--batches max: estimated from the free memory,
#          5% smaller on each out-of-memory), 50 greedy steps a call, 1 warm-up + median of 3.
# profile: python -m moa_jax.bench.influence_profiling per preset: 50 items x 8192 tokens,
#          batch 1, the CLI's default estimator (answer-copy: answer rows on the exact kernel);
#          if the first batch runs out of memory without --remat it runs again with it.
#
# Raw JSON (and logs) go to $OUT: decode_<preset>_32k.json (+ .png), profile_<preset>_8k.json.
# A preset starts only if BUDGET_S (default 520) seconds since the start leave it room
# (MIN_S: decode 60, profile 100), and runs under `timeout` for what is left, so the summary
# always prints; a skipped preset is named with the command that runs it.
set -u -o pipefail

STAGE=${1:-}
case "$STAGE" in
decode | profile) shift ;;
*)
    echo "usage: OUT=DIR $0 decode|profile [PRESET ...]" >&2
    exit 2
    ;;
esac
PRESETS=("$@")
if [ ${#PRESETS[@]} -eq 0 ]; then
    PRESETS=(llama3.1-8b mistral-7b qwen2.5-7b qwen3-8b)
fi
: "${OUT:?set OUT to the output directory}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-520}
if [ "$STAGE" = decode ]; then MIN_S=${MIN_S:-60}; else MIN_S=${MIN_S:-100}; fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 |
    tee "$OUT/${STAGE}_device.txt"
echo "stage $STAGE, presets ${PRESETS[*]}, budget ${BUDGET_S} s, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

SKIPPED=()
RAN=()
for p in "${PRESETS[@]}"; do
    left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt "$MIN_S" ]; then
        SKIPPED+=("$p")
        continue
    fi
    t0=$SECONDS
    RAN+=("$p")
    if [ "$STAGE" = decode ]; then
        timeout --kill-after=10 "$left" "$PY" -m moa_jax.bench.decode --shape "$p" \
            --method dense-kernel moa --moa-densities 0.5 --contexts 32768 --batches max \
            --steps 50 --warmup 1 --iters 3 --out "$OUT/decode_${p}_32k.json" \
            >"$OUT/decode_${p}_32k.log" 2>&1
    else
        timeout --kill-after=10 "$left" "$PY" -m moa_jax.bench.influence_profiling \
            --shape "$p" --length 8192 --items 50 --batch-size 1 --estimator answer-copy \
            --dtype bfloat16 --remat-on-oom --out "$OUT/profile_${p}_8k.json" \
            >"$OUT/profile_${p}_8k.log" 2>&1
    fi
    rc=$?
    echo "$STAGE $p: exit $rc after $((SECONDS - t0)) s (total ${SECONDS} s)"
    if [ "$rc" -ne 0 ]; then tail -n 5 "$OUT/${STAGE}_${p}"_*.log; fi
done

echo "=== summary ($STAGE, ${SECONDS} s) ==="
"$PY" - "$STAGE" "$OUT" "${RAN[@]}" <<'EOF'
import json
import sys
from pathlib import Path

stage, out, presets = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


if stage == "decode":
    print(f"{'':<12} | {'dense kernel':<20} | {'MoA, KV density 0.5':<20} |")
    print(f"{'preset':<12} | " + f"{'batch':>5} {'tok/s':>7} {'ms':>6} | " * 2 + "MoA/dense")
    for p in presets:
        rep = load(out / f"decode_{p}_32k.json")
        if rep is None:
            print(f"{p:<12} | no result")
            continue
        best = {}
        for r in rep["rows"]:
            if r.get("status") == "ok" and r["batch"] > best.get(r["method"], {}).get("batch", 0):
                best[r["method"]] = r
        cells = []
        for m in ("dense-kernel", "moa"):
            r = best.get(m)
            cells.append(
                f"{r['batch']:>5} {r['tokens_per_s']:>7.1f} {r['ms_per_step']:>6.2f}"
                if r
                else f"{'-':>5} {'-':>7} {'-':>6}"
            )
        d, m = best.get("dense-kernel"), best.get("moa")
        ratio = f"{m['tokens_per_s'] / d['tokens_per_s']:.2f}x" if d and m else "-"
        fails = [f"{r['variant']} B={r['batch']} {r['status']}" for r in rep["rows"]
                 if r.get("status") != "ok"]
        print(f"{p:<12} | {cells[0]} | {cells[1]} | {ratio}"
              + (f"  ({'; '.join(fails)})" if fails else ""))
    device = next((r["device"] for p in presets
                   if (r := load(out / f"decode_{p}_32k.json")) and "device" in r), "?")
    print(f"(batch: the largest that ran, context 32768; device {device})")
else:
    print("preset       | stage s | s/item | first batch s | peak GiB | remat")
    for p in presets:
        r = load(out / f"profile_{p}_8k.json")
        if r is None:
            print(f"{p:<12} | no result")
            continue
        remat = "after OOM" if r.get("remat_after_oom") else ("yes" if r["remat"] else "no")
        print(f"{p:<12} | {r['profile_stage_s']:>7} | {r['seconds_per_item']:>6} | "
              f"{r['first_batch_s']:>13} | {r['peak_gib']!s:>8} | {remat}")
EOF
if [ ${#SKIPPED[@]} -gt 0 ]; then
    echo "skipped for time: ${SKIPPED[*]}; run: OUT=\$OUT $0 $STAGE ${SKIPPED[*]}"
fi
