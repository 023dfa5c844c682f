#!/usr/bin/env bash
# The project's GPU checks on a machine with an NVIDIA GPU, nvcc, and a Python that has
# torch (a CUDA build), triton, pybind11, scikit-build-core, pytest and pytest-benchmark:
#
#   benchmarks/gpu_run.sh STAGE [OUT] [extra pytest arguments...]
#
# STAGE: build   build mrus_kernels._C with the CUDA kernels (MRUS_CUDA=ON) and print
#                `python -m mrus_kernels.info`
#        test    pytest -m cuda over tests/ (every GPU test of every operator)
#        bench   the GPU rows of pytest benchmarks (-k cuda), JSON and table into OUT
#        demo    `mrus demo --device cuda --resolution 1` and `--modality us`
#        all     all four in this order
# Every stage but build builds first when the compiled module is missing. Logs go to OUT
# (default ./gpu-results). Wheels found in ./.whl (nibabel, nilearn, monai, ...) are
# installed into a private folder first: the model tests and the demo need nibabel and
# nilearn, MONAI's benchmark rows need monai. MRUS_CUDA_ARCHS (default here: 90, the
# H100/H200) narrows the build to the card at hand.
set -uo pipefail

stage="${1:-all}"
case "$stage" in
  build | test | bench | demo | all) ;;
  *) echo "usage: benchmarks/gpu_run.sh build|test|bench|demo|all [OUT] [pytest args...]" >&2; exit 2 ;;
esac
out="${2:-gpu-results}"
shift $(( $# > 2 ? 2 : $# ))
cd "$(dirname "$0")/.."
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONUNBUFFERED=1 MRUS_CUDA=ON MRUS_CUDA_ARCHS="${MRUS_CUDA_ARCHS:-90}"
py="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" > /dev/null; then
  site=/tmp/mrus-gpu-site
  if [ ! -d "$site" ]; then
    "$py" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
      || { echo "gpu_run: installing .whl/*.whl failed" >&2; exit 1; }
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

build() {
  local t0=$SECONDS
  "$py" -m pip install --root-user-action=ignore --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log"; echo "gpu_run: build failed (log: $out/build.log)" >&2; return 1; }
  echo "gpu_run: built in $(( SECONDS - t0 )) s"
  "$py" -m mrus_kernels.info | tee "$out/info.txt"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$out/info.txt"
  fi
}

ensure_built() {
  "$py" -c "import mrus_kernels._ext as e, sys; sys.exit(0 if e.C is not None and e.C.build_info()['cuda'] else 1)" \
    2> /dev/null || build
}

run_tests() {
  ensure_built || return 1
  "$py" -m pytest tests -m cuda -q -p no:cacheprovider -rfE "$@" 2>&1 | tee "$out/cuda-tests.log"
}

run_bench() {
  ensure_built || return 1
  "$py" -m pytest benchmarks -k cuda -q -p no:cacheprovider --benchmark-json="$out/bench.json" "$@" \
    2>&1 | tee "$out/bench.log"
}

run_demo() {
  ensure_built || return 1
  local rc=0
  for modality in t2 us; do
    "$py" -m mrus_models.cli demo --device cuda --resolution 1 --modality "$modality" --quiet \
      --out "$out/demo-$modality" 2>&1 | tee "$out/demo-$modality.log" || rc=1
  done
  return $rc
}

case "$stage" in
  build) build ;;
  test) run_tests "$@" ;;
  bench) run_bench "$@" ;;
  demo) run_demo ;;
  all) build && { run_tests "$@"; t=$?; run_bench "$@"; b=$?; run_demo; d=$?; exit $(( t || b || d )); } ;;
esac
