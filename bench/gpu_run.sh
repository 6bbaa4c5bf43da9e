#!/usr/bin/env bash
# The one script for a GPU session (run from the repository root; the working tree and .devkit/
# are copied there, nothing can be downloaded):
#
#   OUT=/some/dir bash bench/gpu_run.sh
#
# It installs the wheels of .devkit/whl (what the GPU machine lacks: pydantic, jsonschema,
# nnsight, ...) into $SITE, then runs, most important first, each step under `timeout` and all
# within BUDGET_S seconds of wall time:
#
#   1. sweep_patching on llama8b-random (bf16): (b), specsight, (a)  -> specsight vs (b),
#      and the bf16 difference batched (b) vs one cell per forward (a)
#   2. cuda_check: the golden specs on tiny models, CUDA fp32 / bf16 / bf16 unbatched vs CPU
#   3. generate_steering on llama8b-random: steered generation and attribution vs exact
#   4. sweep_patching again (--merge, the stored (b) reused): single_forward, (d), (c)
#
# Everything lands in $OUT as it is produced (the scripts write their JSON there after each
# method / case / part), so a step cut short still returns what it finished:
#   gpu_run.log, sweep_patching_cuda.json, cuda_check.json, generate_steering_cuda.json,
#   README.md (bench/README.md with the cuda sections the scripts wrote)
# Back home: copy the two JSON files into bench/results/ and rebuild the README sections with
#   python bench/sweep_patching.py --device cuda --report
#   python bench/generate_steering.py --device cuda --report
#
# Environment:
#   OUT          (required) the folder whose files come back
#   BUDGET_S     wall-time budget of the whole script in seconds (default 470)
#   GPU_RUN_CPU  1: a dry run on the CPU (llama-small-random, no nvidia-smi, wheels installed
#                only as a check, not used), for testing this script
#   PYTHON       the interpreter that runs the benchmarks (default python3)
#   INSTALL_PY   the interpreter whose pip installs the wheels (default $PYTHON)
#   DEVKIT       the folder with whl/ and tokenizer/ (default .devkit)
#   SITE         where the wheels go (default /tmp/site)
set -u
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the folder whose files come back}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1

START=$SECONDS
BUDGET=${BUDGET_S:-470}
PY=${PYTHON:-python3}
INSTALL_PY=${INSTALL_PY:-$PY}
DEVKIT=${DEVKIT:-.devkit}
SITE=${SITE:-/tmp/site}
CPU_MODE=${GPU_RUN_CPU:-0}
if [ "$CPU_MODE" = 1 ]; then
    # bf16 generation: the path cuda takes (token agreement reported, not required); one torch
    # thread, as a shared CPU otherwise slows down many times
    DEV=cpu MODEL=llama-small-random GEN_DTYPE=bfloat16 THREADS=(--threads 1)
else
    DEV=cuda MODEL=llama8b-random GEN_DTYPE=bfloat16 THREADS=()
fi
export SITE INSTALL_PY DEVKIT
# cuda_check's models, most important first (it goes model by model; vit_patching runs on
# tiny-vit after the first)
TINY=tiny-llama,tiny-gpt2,tiny-qwen3,tiny-gemma2,tiny-mixtral,tiny-gpt-neox,tiny-mamba,tiny-phi3

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME MAX_SECONDS COMMAND...: run COMMAND under timeout (MAX_SECONDS, or what is left of
# the budget), log its status and time, and refresh $OUT/README.md; never stops the script
step() {
    local name=$1 max=$2
    shift 2
    local remaining t t0 rc
    remaining=$(left)
    t=$((max < remaining ? max : remaining))
    if [ "$t" -lt 20 ]; then
        echo "=== SKIP $name: ${remaining}s of the budget left"
        return 0
    fi
    echo "=== $name: start $(date -u +%T), timeout ${t}s, ${remaining}s of the budget left"
    t0=$SECONDS
    timeout -k 5 "$t" "$@"
    rc=$?
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "=== $name: TIMED OUT"
    echo "=== $name: rc=$rc after $((SECONDS - t0))s"
    cp -f bench/README.md "$OUT/README.md" 2>/dev/null
    return 0
}

# (a function exported to the `bash -c` that timeout runs)
install_wheels() {
    rm -rf "$SITE" && mkdir -p "$SITE"
    if "$INSTALL_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" "$DEVKIT"/whl/*.whl; then
        echo "installed $(ls "$DEVKIT"/whl | wc -l) wheels into $SITE"
    else  # no pip: a wheel is a zip of what goes into site-packages
        echo "pip failed; unzipping the wheels instead"
        for w in "$DEVKIT"/whl/*.whl; do "$INSTALL_PY" -m zipfile -e "$w" "$SITE"; done
    fi
}

echo "=== gpu_run.sh: $(date -u +%FT%TZ), device $DEV, model $MODEL, budget ${BUDGET}s"
echo "=== git: $(git log -1 --format='%h %s' 2>/dev/null); $(git status --short 2>/dev/null | wc -l) changed files"
export -f install_wheels
step install 90 bash -c install_wheels
if [ "$CPU_MODE" = 1 ]; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the wheels are cp312: only checked
else
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export SPECSIGHT_BENCH_TOKENIZER="$PWD/$DEVKIT/tokenizer"
export SPECSIGHT_CACHE=/tmp/specsight-cache  # empty: nothing may need the built-in model
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
mkdir -p "$SPECSIGHT_CACHE"

if [ "$CPU_MODE" != 1 ]; then
    step nvidia-smi 20 nvidia-smi
fi
step versions 60 "$PY" -c '
import platform, torch, transformers, nnsight, pydantic, jsonschema, specsight
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| nnsight", nnsight.__version__,
      "| pydantic", pydantic.VERSION, "| specsight", specsight.__version__)
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("cpus:", __import__("os").cpu_count())
'

# 1. the key numbers: specsight vs (b), and (a) one cell per forward vs (b) batched in bf16
step sweep-b-specsight-a 240 "$PY" bench/sweep_patching.py --device "$DEV" --model "$MODEL" \
    --methods b,specsight,a --repeats 5 --keep-going --method-timeout 120 --out-dir "$OUT" \
    ${THREADS[@]+"${THREADS[@]}"}
# 2. correctness on CUDA: fp32 and bf16 vs the CPU, bf16 batched vs one row per forward
step cuda-check 90 "$PY" bench/cuda_check.py --device "$DEV" --models "$TINY" \
    --out "$OUT/cuda_check.json" ${THREADS[@]+"${THREADS[@]}"}
# 3. steered generation (hooks / specsight / nnsight) and attribution vs the exact sweep
step generate-steering 150 "$PY" bench/generate_steering.py --device "$DEV" --model "$MODEL" \
    --dtype "$GEN_DTYPE" --rounds 3 --out-dir "$OUT"
# 4. the rest of the sweep table, merged into the JSON of step 1
step sweep-single-d-c 240 "$PY" bench/sweep_patching.py --device "$DEV" --model "$MODEL" \
    --methods single_forward,d,c --merge --reuse-reference --keep-going --method-timeout 100 \
    --out-dir "$OUT" ${THREADS[@]+"${THREADS[@]}"}

cp -f bench/README.md "$OUT/README.md" 2>/dev/null
rm -f "$OUT"/*.tmp
echo "=== done after $((SECONDS - START))s; in $OUT:"
ls -la "$OUT"
