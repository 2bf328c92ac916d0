#!/usr/bin/env bash
# One prepared run on a lent CUDA machine: the SDXL benchmark (issue 3's targets), the FLUX `stream` benchmark
# (issue 12's), then the GPU tests.
#
# Run from the repository root on a machine whose python3 has CUDA torch, accelerate and transformers.
# Packages it lacks (diffusers, pydantic, the quantization backends) can come as wheels in .whl/
# (installed into /tmp/site, nothing else touched). Logs and JSON go to $OUT (default /tmp/gpu-out).
# Each phase has its own time limit, so a hang in one still leaves the others' results.
#
#   BENCH_S=330 FLUX_S=420 TEST_S=150 bash benchmarks/gpu_session.sh   (0 skips a phase)
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
# offloadkit itself is installed too (its built-in policies and profiles are packages mapped from
# policies/ and hardware/); python runs with -P where it would put the checkout first on sys.path
# (`-m`, `-c`, stdin), so the source folder does not shadow the installed package.
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" . \
    || exit 1
export PYTHONPATH=$SITE

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv
    python3 -P - <<'EOF'
import importlib, platform, os
print("python", platform.python_version(), "cpus", os.cpu_count())
for name in ("torch", "diffusers", "accelerate", "transformers", "pydantic", "torchao", "optimum.quanto",
             "bitsandbytes", "gguf"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:  # reported, not fatal: the tests that need it skip
        print(name, "NOT IMPORTABLE:", type(error).__name__, str(error)[:200])
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0))
EOF
} 2>&1 | tee "$OUT/env.txt"

# a measured profile of this machine, for the predicted transfer times in the benchmark
# (HARDWARE=path: use that profile instead and skip the ~20 s of measuring)
if [ -z "${HARDWARE:-}" ]; then
    timeout 90 python3 -P -m offloadkit calibrate --device cuda -o "$OUT/calibrated.yaml" --force 2>&1 \
        | tail -5 | tee "$OUT/calibrate.txt"
    HARDWARE=""
    [ -s "$OUT/calibrated.yaml" ] && HARDWARE="$OUT/calibrated.yaml"
fi

METHODS=${METHODS:-none,diffusers-model,ok-pinned,ok-copy-free,ok-default,diffusers-group,ok-group-all,ok-group-stream,ok-pinned-prefetch}
if [ "${BENCH_S:-330}" != 0 ]; then
    timeout "${BENCH_S:-330}" python3 benchmarks/bench_gpu.py --hardware "$HARDWARE" --methods "$METHODS" --calls "${CALLS:-3}" \
        --transition-calls "${TRANSITION_CALLS:-2}" --child-timeout "${CHILD_S:-150}" \
        --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
    echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench_gpu.txt"
fi

# `stream` on a FLUX.1-dev-sized transformer (issue 12's targets): 24 GB of random bf16 weights, built once and
# cached in $FLUX_CACHE; every method in its own process. FLUX_METHODS picks a subset.
PINNED=""
[ -n "$HARDWARE" ] && PINNED=$(python3 -P -c "import sys, yaml; print(float(str(yaml.safe_load(open(sys.argv[1]))['h2d_pinned']).rstrip('GB/s')))" "$HARDWARE" 2>/dev/null)
FLUX_METHODS=${FLUX_METHODS:-resident,stream-12g,group-block,stream-16g,stream-8g,group-leaf,model-offload,torchao-resident,torchao-stream-12g,torchao-model-offload,nf4-resident,nf4-stream-12g,nf4-model-offload}
if [ "${FLUX_S:-420}" != 0 ]; then
    timeout "${FLUX_S:-420}" python3 benchmarks/bench_gpu.py --flux --methods "$FLUX_METHODS" --steps "${FLUX_STEPS:-4}" \
        --calls "${FLUX_CALLS:-2}" --repeat "${FLUX_REPEAT:-50}" --child-timeout "${FLUX_CHILD_S:-240}" \
        --cache "${FLUX_CACHE:-/tmp/offloadkit-bench-weights}" ${PINNED:+--pinned-gbs "$PINNED"} \
        --json "$OUT/bench_flux_stream.json" 2>&1 | tee "$OUT/bench_flux_stream.txt"
    echo "flux bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench_flux_stream.txt"
fi

PER_TEST=""
python3 -P -c "import pytest_timeout" 2>/dev/null && PER_TEST="--timeout 90"
timeout "${TEST_S:-150}" python3 -P -m pytest tests/test_gpu.py tests/test_hardware.py -m gpu -q -p no:cacheprovider -o addopts="" -rsfE \
    $PER_TEST --junitxml "$OUT/test_gpu.xml" 2>&1 | tee "$OUT/test_gpu.txt"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/test_gpu.txt"
