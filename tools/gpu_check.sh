#!/usr/bin/env bash
# One-shot GPU check of setdiv on a machine that has torch + CUDA but not setdiv's other
# dependencies: installs the wheels tools/gpu_wheels.sh put in .whl/ (no index, no network) into $SITE, then
#   a. the tests marked `cuda` (tests/test_cuda.py: the model math and every tower family on
#      the device against CPU references), the fused kernel's tests compiled for the GPU
#      (tests/test_kernels.py; CI runs them under Triton's interpreter), the decoding tests
#      and the model-math / tower unit tests
#   b. tools/bench_similarity.py on CUDA (COCO 5K x 25K shape): the Triton and torch kernels
#      against the bare GEMM
#   c. tools/bench_train_step.py on CUDA, bf16: the paper's ROI + bi-GRU recipe, with MFU and
#      similarity + loss (both kernels) against the official formulation
#   e. tools/bench_train_step.py --recipe vit_setheads on CUDA, bf16 (frozen ViT-B/16 towers)
#   f. tools/bench_train_step.py --recipe resnext_bert on CUDA, bf16 (512 px, BERT-base)
#   g. tools/bench_reader.py --decode-only --device cuda: JPEG decoding per CPU core (whole vs
#      DCT-scaled) and the nvJPEG device path
#   d. synthetic shards -> `setdiv train` (DeepSpeed, CUDA accelerator, bf16, 2 epochs) ->
#      `setdiv export` -> `setdiv eval` on CUDA
# Every step runs under `timeout`, logs into $OUT/ (env.log, a_pytest.log, b_bench_similarity.log,
# c_bench_train_step.log, e_bench_vit_step.log, f_bench_resnext_step.log, g_bench_decode.log,
# d_train_eval.log, summary.txt, table.md); a failed step does not stop the next. The summary
# ends with one Markdown table for BENCHMARKS.md (table.md). Run from the repository root:
#   bash tools/gpu_check.sh
# Worst case (every cap hit) 7.5 minutes of steps (caps 90+45+45+60+60+45+105 s) plus the
# install; expected 3-5 minutes on one H200.
# Local dry run on a CPU machine (same commands, CPU device, the venv's own packages: the .whl/
# wheels are for the GPU machine's CPython 3.12):
#   PY=.venv/bin/python DEVICE=cpu DS_ACC=cpu WHEELS=0 OUT=/tmp/gc_out bash tools/gpu_check.sh
set -u
set -o pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DS_ACC=${DS_ACC:-cuda}
OUT=${OUT:-/tmp/gpu_check_out}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/setdiv_gpu_check}
CAP_A=${CAP_A:-90}
CAP_B=${CAP_B:-45}
CAP_C=${CAP_C:-45}
CAP_E=${CAP_E:-60}
CAP_F=${CAP_F:-60}
CAP_G=${CAP_G:-45}
CAP_D=${CAP_D:-105}
WHEELS=${WHEELS:-1}  # 0: install nothing (a dry run with a complete environment)
STEPS=${STEPS:-abcefgd}  # which of the steps to run (e.g. STEPS=d)
want() { [[ "$STEPS" == *"$1"* ]]; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=/tmp/setdiv_torch_extensions  # nothing written into the repo
export MPLBACKEND=Agg

SUMMARY=()
T_ALL=$SECONDS
record() {  # name rc seconds
    SUMMARY+=("$(printf '%-22s rc=%-4s %4ss' "$1" "$2" "$3")")
}

# ---------------------------------------------------------------- environment + wheels
t0=$SECONDS
{
    echo "=== $(date -u) host $(uname -n) repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi || echo "nvidia-smi FAILED rc=$?"
    rm -rf "$SITE"
    if [ "$WHEELS" = 0 ]; then echo "WHEELS=0: no wheels installed"; exit 0; fi
    install_wheels() {  # pip, or where pip fails, unzip: a wheel is a zip of its site-packages tree
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$@" && return 0
        echo "pip install failed (rc=$?): extracting $* into $SITE instead"
        local w r=0
        for w in "$@"; do "$PY" -m zipfile -e "$w" "$SITE" || r=$?; done
        return "$r"
    }
    install_wheels .whl/*.whl
    rc=$?
    # pydantic 2.14 needs typing-extensions>=4.16: add the shipped one only if the machine's is older.
    "$PY" - <<'EOF'
import sys
from importlib.metadata import version
from packaging.version import Version
v = version("typing_extensions")
print(f"machine typing_extensions {v}")
sys.exit(0 if Version(v) >= Version("4.16.0") else 1)
EOF
    if [ $? -ne 0 ] && ls .whl/extra/typing_extensions-*.whl >/dev/null 2>&1; then
        echo "installing .whl/extra/typing_extensions into $SITE"
        install_wheels .whl/extra/typing_extensions-*.whl || rc=$?
    fi
    echo "wheel install rc=$rc; in $SITE:"
    ls "$SITE" | grep -i 'dist-info$' | tr '\n' ' '
    echo
    exit "$rc"
} 2>&1 | tee "$OUT/env.log"
record install "$?" $((SECONDS - t0))
export PYTHONPATH="$SITE:$PWD"

{
    "$PY" - <<'EOF'
import platform, sys, time
t0 = time.time()
import torch
print(f"python {sys.version.split()[0]} {platform.machine()} | torch {torch.__version__} "
      f"cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()} "
      f"| cuda available {torch.cuda.is_available()} devices {torch.cuda.device_count()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm {p.major}{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}, nccl {torch.cuda.nccl.version()}")
import importlib
for name in ("deepspeed", "pydantic", "omegaconf", "webdataset", "braceexpand", "nltk",
             "eccv_caption", "faiss", "transformers", "torchvision", "numpy", "typing_extensions",
             "timm", "open_clip", "safetensors", "ftfy"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:<18} {getattr(m, '__version__', '?'):<12} {m.__file__}")
    except Exception as exc:  # noqa: BLE001
        print(f"  {name:<18} IMPORT FAILED: {type(exc).__name__}: {exc}")
import setdiv.cli, setdiv.train.trainer, setdiv.eval.run, setdiv.index.store  # noqa: E401,F401
print(f"setdiv imports OK ({time.time() - t0:.1f} s)")
EOF
    echo "imports rc=$?"
} 2>&1 | tee -a "$OUT/env.log"

# One step: run `command` under its cap, log it to $OUT/LOG, record its exit code and time.
step() {  # letter title cap log command...
    local letter=$1 title=$2 cap=$3 log=$OUT/$4 t0=$SECONDS rc
    shift 4
    want "$letter" || return 0
    echo "=== $letter. $title (cap ${cap}s)"
    timeout -k 10 "$cap" "$@" 2>&1 | tee "$log"
    rc=$?
    [ "$rc" -eq 0 ] || printf "\nSTEP %s FAILED rc=%s\n" "$letter" "$rc" | tee -a "$log"
    record "$(basename "$log" .log)" "$rc" $((SECONDS - t0))
}
cuda() { [ "$DEVICE" = cuda ]; }

# a. unit tests. CPU dry run: the `cuda` tests on the CPU (SETDIV_TEST_DEVICE=cpu), which
# otherwise skip.
cuda || export SETDIV_TEST_DEVICE=cpu
step a pytest "$CAP_A" a_pytest.log "$PY" -m pytest -q -n 0 --timeout=120 -p no:cacheprovider \
    tests/test_cuda.py tests/test_kernels.py tests/test_images.py tests/test_similarity.py \
    tests/test_losses.py tests/test_model.py tests/test_towers.py tests/test_metrics.py \
    tests/test_optim.py
# b. similarity benchmark (CPU dry run: small)
if cuda; then B_ARGS=(); else B_ARGS=(--images 500); fi
step b bench_similarity "$CAP_B" b_bench_similarity.log "$PY" tools/bench_similarity.py \
    --device "$DEVICE" ${B_ARGS[@]+"${B_ARGS[@]}"}
# c. training-step benchmark (CPU dry run: few images, but >= 2 shards of 100 for the 2-worker
# reader it times on CPU)
if cuda; then C_ARGS=(); else C_ARGS=(--images 34 --reps 1); fi
step c "bench_train_step bf16" "$CAP_C" c_bench_train_step.log "$PY" tools/bench_train_step.py \
    --device "$DEVICE" --precision bf16 ${C_ARGS[@]+"${C_ARGS[@]}"}
# e. ViT recipe step benchmark
if cuda; then E_ARGS=(--images 256); else E_ARGS=(--images 2 --reps 1); fi
step e "bench_train_step --recipe vit_setheads bf16" "$CAP_E" e_bench_vit_step.log "$PY" \
    tools/bench_train_step.py --recipe vit_setheads --device "$DEVICE" --precision bf16 "${E_ARGS[@]}"
# f. ResNeXt-BERT step benchmark
if cuda; then F_ARGS=(--images 32); else F_ARGS=(--images 2 --reps 1); fi
step f "bench_train_step --recipe resnext_bert bf16" "$CAP_F" f_bench_resnext_step.log "$PY" \
    tools/bench_train_step.py --recipe resnext_bert --device "$DEVICE" --precision bf16 "${F_ARGS[@]}"
# g. decoding benchmark
step g "bench_reader --decode-only" "$CAP_G" g_bench_decode.log "$PY" tools/bench_reader.py \
    --decode-only --repeats 2 --device "$DEVICE"

# ---------------------------------------------------------------- d. train / export / eval
if want d; then
t0=$SECONDS
echo "=== d. synthetic shards -> train -> export -> eval (cap ${CAP_D}s in all)"
N_TRAIN=${N_TRAIN:-2000}
N_VAL=${N_VAL:-200}
N_TEST=${N_TEST:-500}
EPOCHS=${EPOCHS:-2}
{
    D_END=$((SECONDS + CAP_D))
    left() { local n=$((D_END - SECONDS)); [ "$n" -gt 1 ] && echo "$n" || echo 1; }
    run_d() {  # label, command...
        local label=$1 s=$SECONDS rc
        shift
        echo "--- d.$label: $*"
        timeout -k 5 "$(left)" "$@"
        rc=$?
        echo "--- d.$label rc=$rc ($((SECONDS - s)) s)"
        return "$rc"
    }
    DATA=$WORK/synth
    RUN=$WORK/run_gpu
    rm -rf "$WORK"
    mkdir -p "$WORK"
    run_d shards_train "$PY" -m setdiv.cli shards synthetic --split train --images "$N_TRAIN" \
        --shard-size 250 --out "$DATA" &&
    run_d shards_val "$PY" -m setdiv.cli shards synthetic --split val --images "$N_VAL" \
        --shard-size 250 --out "$DATA" &&
    run_d shards_test "$PY" -m setdiv.cli shards synthetic --split test --images "$N_TEST" \
        --shard-size 250 --out "$DATA" &&
    run_d vocab "$PY" -m setdiv.cli vocab --shards "$DATA/train-*.tar" --out "$DATA/vocab.json" &&
    run_d train env DS_ACCELERATOR="$DS_ACC" "$PY" -m setdiv.cli train configs/demo.yaml \
        "model.text.vocab_path=$DATA/vocab.json" model.text.vocab_size=null \
        "data.train_shards=$DATA/train-*.tar" "data.val_shards=$DATA/val-*.tar" \
        "train.epochs=$EPOCHS" train.precision=bf16 --run-dir "$RUN" &&
    run_d export env DS_ACCELERATOR="$DS_ACC" "$PY" -m setdiv.cli export "$RUN" --tag best &&
    run_d eval env DS_ACCELERATOR="$DS_ACC" "$PY" -m setdiv.cli eval "$RUN" \
        --data "$DATA/test-*.tar" --protocol coco --analysis
    rc=$?
    echo "--- run directory:"
    ls -la "$RUN" "$RUN/export" "$RUN/eval" 2>&1 | head -40
    echo "--- metrics.jsonl (tail):"
    tail -n 8 "$RUN/metrics.jsonl" 2>&1
    echo "--- eval/metrics.json:"
    head -c 3000 "$RUN/eval/metrics.json" 2>&1
    echo
    exit "$rc"
} 2>&1 | tee "$OUT/d_train_eval.log"
rc=$?
[ "$rc" -eq 0 ] || printf "\nSTEP d FAILED rc=%s\n" "$rc" | tee -a "$OUT/d_train_eval.log"
record d_train_eval "$rc" $((SECONDS - t0))
fi

# ---------------------------------------------------------------- summary
{
    echo "=== summary ($((SECONDS - T_ALL)) s in all; device $DEVICE, DS_ACCELERATOR $DS_ACC for d)"
    for line in "${SUMMARY[@]}"; do echo "$line"; done
    grep -hE "Guessing device|ProcessGroupNCCL|Traceback" "$OUT/d_train_eval.log" 2>/dev/null
    "$PY" tools/gpu_check_table.py "$OUT" | tee "$OUT/table.md"
} 2>&1 | tee "$OUT/summary.txt"
