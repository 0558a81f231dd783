#!/usr/bin/env bash
# One device call: install the wheels the GPU machine lacks (from .whl/, carried: it is git-ignored),
# then the 14B transformer forward sweep and one real-size pipeline shot, all weights on the GPU,
# then with model CPU offload if the time left allows. Whole file: under BUDGET_S (7 min).
#
#   bash bench/gpu_run.sh            # from the repository root; logs to $OUT/gpu_log.txt, JSON to $OUT/
#   RUNS=modes BUDGET_S=560 bash bench/gpu_run.sh   # one real-size shot per speed mode (storymem.speed),
#                                                   # then the table of bench/gpu_modes.py (issue 12's targets)
#
# Overrides for a local dry run: PY (python), WHEELS (wheel folder, empty: install nothing),
# SITE (install target), EXTRA (extra gpu_pipeline.py arguments, e.g. "--device cpu --tiny").
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
WHEELS=${WHEELS-.whl}
SITE=${SITE:-/tmp/site}
BUDGET_S=${BUDGET_S:-420}
EXTRA=${EXTRA:-}
RUNS=${RUNS:-forward none model}  # which runs: forward, none, model, modes (e.g. RUNS=none on an H200)
# Speed modes in priority order (RUNS=modes); "fast+lora" stacks a random rank-64 LightX2V-format LoRA.
MODES=${MODES:-fast+lora exact compiled lowvram}  # add "cached" by hand: random weights say nothing of its hit rate
START=$SECONDS
mkdir -p "$OUT"

note() { echo "[gpu_run] $(( SECONDS - START )) s used of ${BUDGET_S} s: $*"; }
left() { echo $(( BUDGET_S - (SECONDS - START) )); }

install() {  # wheels are plain zips: without pip, unpacking them is the whole install
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"
    else
        "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" "$@"
    fi
}

run() {  # run NAME NEEDED_S ARGS...: skipped when fewer than NEEDED_S seconds are left
    local name=$1 need=$2 rc
    shift 2
    if (( $(left) < need )); then note "skip $name (needs ~${need} s, $(left) s left)"; return 0; fi
    note "start $name"
    timeout -k 10 $(( $(left) - 5 )) "$PY" "$@"
    rc=$?
    note "end $name (rc=$rc)"
}

main() {
    note "start on $(hostname); OUT=$OUT"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
    if [[ -n "$WHEELS" ]]; then
        mkdir -p "$SITE"
        install "$WHEELS"/*.whl || { note "wheel install failed"; return 1; }
    fi
    export PYTHONPATH="$SITE:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    # diffusers 0.42 wants huggingface_hub >= 1.32; the machine's transformers allows any 1.x.
    if [[ -n "$WHEELS" ]] && ! "$PY" -c 'import sys, importlib.metadata as m; from packaging.version import Version as V
sys.exit(V(m.version("huggingface_hub")) < V("1.32"))'; then
        note "huggingface_hub < 1.32 here: installing $(ls "$WHEELS"/hub)"
        install "$WHEELS"/hub/*.whl || { note "hub wheel install failed"; return 1; }
    fi
    "$PY" -c 'import importlib.metadata as m, torch, storymem.pipeline, accelerate
print("versions:", "python", __import__("sys").version.split()[0], *(f"{p} {m.version(p)}" for p in
      ("torch", "diffusers", "transformers", "huggingface_hub", "accelerate", "pydantic", "peft")))' \
        || { note "import check failed"; return 1; }
    note "setup done"
    [[ " $RUNS " == *" forward "* ]] && run gpu_forward 100 bench/gpu_forward.py --model 14b --memory 0 3 6 10 --repeats 2
    # shellcheck disable=SC2086
    [[ " $RUNS " == *" none "* ]] && run "gpu_pipeline --offload none" 120 bench/gpu_pipeline.py --offload none --json "$OUT/gpu_pipeline_none.json" $EXTRA
    # shellcheck disable=SC2086
    [[ " $RUNS " == *" model "* ]] && run "gpu_pipeline --offload model" 170 bench/gpu_pipeline.py --offload model --json "$OUT/gpu_pipeline_model.json" $EXTRA
    if [[ " $RUNS " == *" modes "* ]]; then
        local m need flags
        for m in $MODES; do
            case $m in  # rough H200 seconds: init + one 4-step shot (+ compile, + CPU init and streaming)
                fast*) need=90 ;; lowvram) need=180 ;; compiled) need=160 ;; *) need=100 ;;
            esac
            flags="--speed ${m%%+*}"
            [[ $m == *+lora ]] && flags="$flags --speed-lora"
            # shellcheck disable=SC2086
            run "mode $m" "$need" bench/gpu_pipeline.py $flags --json "$OUT/gpu_mode_${m/+/_}.json" $EXTRA
        done
        ls "$OUT"/gpu_mode_*.json >/dev/null 2>&1 && "$PY" bench/gpu_modes.py "$OUT"/gpu_mode_*.json | tee "$OUT/gpu_modes.md"
    fi
    note "done"
}

main 2>&1 | tee -a "$OUT/gpu_log.txt"
