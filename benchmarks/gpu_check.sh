#!/bin/bash
# Issue 6 on one GPU: leak-free packing checked there, throughput against plain TRL, several trials at once, and a
# sweep's wall time, on LFM2.5-230M built from its config (random weights: same speed, no download).
#
# Prepare here (repo root), once:   bash ../shared/device/make_wheels.sh schedulefree==1.4.1 lion-pytorch==0.2.5
# Run with the device tool:         command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 600
# Choose parts (default: throughput concurrent study):
#   bash benchmarks/gpu_check.sh equivalence throughput micro4 concurrent concurrent8 compile study
# Knobs (environment): BUDGET_S (seconds for all parts, default 540), STEPS (optimizer steps per throughput arm, 30),
#   STUDY_SPACE (sweep timed by study_wall, optimizers = 4 trials), STUDY_STEPS (30), STUDY_SET (extra --set items).
# Everything lands in $OUT: <part>.json (the benchmark's JSON), <part>.log (its stderr), steps.txt, summary.txt.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PARTS=${*:-throughput concurrent study}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
STEPS=${STEPS:-30}
MODEL=LiquidAI/LFM2.5-230M

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_CACHE=/tmp/hf_random_weights TUNE_LFM_CACHE=/tmp/tune_lfm_cache

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c 'import torch, transformers, trl, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "| transformers", transformers.__version__, "| trl", trl.__version__, "| peft", peft.__version__)' > "$OUT/versions.txt"
python3 -c 'import causal_conv1d' 2>/dev/null && echo "causal_conv1d installed" >> "$OUT/versions.txt"

# run NAME LIMIT_S COMMAND...: the command's stdout to NAME.json, stderr to NAME.log, cut at the budget's end
run() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) )); (( limit > left )) && limit=$left
  if (( limit < 20 )); then echo "$name skipped: budget spent" | tee -a "$OUT/steps.txt"; return; fi
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "$name exit=$? ${limit}s-limit $(( $(date +%s) - start ))s" | tee -a "$OUT/steps.txt"
}

run offline_model 90 python3 benchmarks/offline_model.py --cache-dir "$HF_HUB_CACHE"
THROUGHPUT=(python3 benchmarks/throughput.py --model "$MODEL" --steps "$STEPS" --warmup-steps 3 --device cuda)
for part in $PARTS; do
  case $part in
    equivalence) run equivalence 120 python3 benchmarks/packing_equivalence.py --model "$MODEL" --device cuda ;;
    throughput) run throughput 180 "${THROUGHPUT[@]}" ;;  # plain TRL against the trial path, planned micro-batch
    micro4) run throughput_mb4 100 "${THROUGHPUT[@]}" --arms tune_lfm --micro-batch 4 ;;  # at the study's micro-batch
    concurrent) run concurrent4 150 "${THROUGHPUT[@]}" --arms tune_lfm --concurrent 4 ;;
    concurrent8) run concurrent8 180 "${THROUGHPUT[@]}" --arms tune_lfm --concurrent 8 ;;  # is 4 per GPU the best?
    compile) run throughput_compile 180 "${THROUGHPUT[@]}" --arms tune_lfm --compile ;;
    study)
      read -ra extra <<< "${STUDY_SET:-}"
      sets=(); for item in "${extra[@]}"; do sets+=(--set "$item"); done
      run study_wall 300 python3 benchmarks/study_wall.py --space "${STUDY_SPACE:-optimizers}" --scale full \
        --set "max_steps=${STUDY_STEPS:-30}" --set data_source=embedded "${sets[@]}" --log "$OUT/study_search.log" ;;
    *) echo "unknown part '$part'; parts: equivalence throughput micro4 concurrent concurrent8 compile study" \
         | tee -a "$OUT/steps.txt" ;;
  esac
done

python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None

print((out / "versions.txt").read_text().strip())
eq = load("equivalence")
if eq:
    print(f"equivalence ok={eq['ok']} kernel={eq['attention_kernel']}")
    for row in eq["models"]:
        print(f"  {row['precision']:>14} {row['attention']:>16} fixed={row['fixed']:.2e} leaky={row['leaky']:.2e} "
              f"scale={row['logit_scale']:.2f} ok={row['ok']}")
for name in ("throughput", "throughput_mb4", "throughput_compile"):
    report = load(name)
    for arm, row in (report or {}).get("arms", {}).items():
        print(f"{name:>22} {arm:>10} micro={row['micro_batch']:>2} {row['attention']:>16} "
              f"{row['tokens_per_s']:>10,.0f} tok/s step={row['step_s']:.3f}s mem={row['peak_mem_gb']:.1f}GiB "
              f"loss={row['final_loss']:.4f}")
    if report and "speedup" in report:
        print(f"{'':>22} speedup={report['speedup']:.2f} losses_agree={report['losses_agree']} "
              f"same_tokens={report['same_tokens']}")
for name in ("concurrent4", "concurrent8"):
    conc = load(name)
    if conc:
        c = conc["concurrent"]
        per_copy = [round(x) for x in c["per_copy_tokens_per_s"]]
        memory = [round(m, 1) for m in c["per_copy_peak_mem_gb"]]
        print(f"concurrent x{c['copies']}: aggregate {c['aggregate_tokens_per_s']:,.0f} tok/s "
              f"(per copy {per_copy}, peak GiB {memory})")
wall = load("study_wall")
if wall:
    print(f"study_wall {wall['command']}: {wall['wall_s']:.0f}s; study {wall['study']}; "
          f"trial-seconds {wall['trial_seconds']}; trials {wall['trials']}")
PY
