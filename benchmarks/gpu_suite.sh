#!/usr/bin/env bash
# Runs every GPU benchmark (and the GPU-marked tests) in one go on the device machine, one log per
# step under $OUT (default ./gpu-out). Each step has its own time limit so one hang cannot eat the rest.
#   bash benchmarks/gpu_suite.sh [step ...]      steps: env tests gla bench megabyte cache hf triton
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Optional anchors (MEGABYTE-pytorch, fla) travel as wheels in .whl/ (see the device README).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(env tests gla triton bench megabyte cache hf)
run() {  # run NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" | tee -a "$OUT/summary.log"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/summary.log"
}
for s in "${steps[@]}"; do
  case $s in
    env) run env 60 bash -c 'nvidia-smi; python3 -c "import torch, triton, transformers, sys; print(sys.version); print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"' ;;
    tests) run tests 300 python3 -m pytest -q -m gpu tests -rs --durations=10 ;;
    profile) run profile 200 python3 benchmarks/profile_decode.py --device cuda ;;
    gla) run gla 120 python3 benchmarks/bench_gla_op.py --device cuda --dtype bfloat16 --B 4 --T 2048 8192 --H 4 --K 128 --V 256 --backends chunk ;;
    triton) run triton 300 python3 benchmarks/bench_gla_triton.py --out "$OUT/gla_triton.jsonl" ;;
    bench) run bench 420 python3 -m longseq bench --device cuda --models gla,transformer --presets base,medium --seq-lens 2048,8192 --batch-tokens 16384 --steps 5 --warmup 2 --json "$OUT/bench.json" ;;
    megabyte) run megabyte 300 python3 benchmarks/bench_megabyte.py --device cuda ;;
    cache) run cache 300 python3 benchmarks/bench_cache_decode.py --json "$OUT/cache_decode.json" ;;
    hf) run hf 420 python3 benchmarks/bench_hf_cache.py --fast-prefill --out "$OUT/hf_cache" ;;
    *) echo "unknown step $s" ;;
  esac
done
