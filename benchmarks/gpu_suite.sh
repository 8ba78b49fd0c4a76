#!/usr/bin/env bash
# Runs every GPU benchmark (and the GPU-marked tests) in one go on the device machine, one log per
# step under $OUT (default ./gpu-out). Each step has its own time limit so one hang cannot eat the rest.
#   bash benchmarks/gpu_suite.sh [step ...]
#   steps: env tests gla triton triton2 triton-decode tune-rules bench bench-compile bench-compile-8k compile-time train-profile decode decode-b1 decode-smollm2 decode-fused decode-bounded decode-hybrid megabyte megabyte-fused megabyte-compile cache hf recall
#          profile triton-profile prefill
#   with GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf also: prefill-smollm2 passkey-smollm2 sweep-smollm2
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: some steps write to it from other folders
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Optional anchors (MEGABYTE-pytorch, fla) and the .gguf readers (gguf, accelerate) travel as wheels in .whl/
# (git-ignored: `bash benchmarks/fetch_wheels.sh` fills it; name .whl in the device call's carry list) or
# gpu_wheels/ (untracked).
wheels=$(ls .whl/*.whl gpu_wheels/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# fla autotunes each kernel on the first call of a shape (~330 s per shape on a fresh host) and keeps the winners in
# Triton's cache as *.autotune.json. They travel between calls (and hosts of the same card) in .tcache/ (git-ignored;
# name it in the call's carry list); every run leaves the current set in $OUT/tcache.tgz (one file: the device tool
# returns a limited number of files), to unpack with `mkdir -p .tcache && tar -xzf .../tcache.tgz -C .tcache`.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache} TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
[ -d .tcache ] && cp -rn .tcache/. "$TRITON_CACHE_DIR"/
save_autotune() {
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar -czf "$OUT/tcache.tgz" --null -T -)
}
trap save_autotune EXIT
# The built-in corpus's works as files (the pretrained-model steps take --data files).
WORKS=${WORKS:-/tmp/works}
SWEEP_WORKS=${SWEEP_WORKS:-"hamlet tempest sonnets macbeth lear othello romeo_and_juliet twelfth_night julius_caesar midsummer_nights_dream merchant_of_venice richard_iii"}
if [ ! -d "$WORKS" ]; then mkdir -p "$WORKS" && tar -xJf src/longseq/data/corpus/shakespeare.tar.xz -C "$WORKS"; fi
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(env tests gla triton bench megabyte cache hf)
run() {  # run NAME SECONDS CMD...
  local name=$1 limit=${STEP_LIMIT:-$2}; shift 2  # STEP_LIMIT=s overrides every step's limit
  echo "=== $name: $*" | tee -a "$OUT/summary.log"
  local t0=$SECONDS
  # each log line stamped with the wall clock: where a step spent its minutes shows in its log
  # (a last line without a newline, as a killed step leaves it, is kept too)
  timeout "$limit" "$@" 2>&1 | while IFS= read -r line || [ -n "$line" ]; do printf '%(%T)T %s\n' -1 "$line"; done >"$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$OUT/summary.log"
}
for s in "${steps[@]}"; do
  case $s in
    env) run env 60 bash -c 'nvidia-smi; python3 -c "import torch, triton, transformers, sys; print(sys.version); print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"' ;;
    tests) run tests 300 python3 -m pytest -q -m gpu tests -rs --durations=10 ;;
    profile) run profile 200 python3 benchmarks/profile_decode.py --device cuda ;;
    gla) run gla 120 python3 benchmarks/bench_gla_op.py --device cuda --dtype bfloat16 --B 4 --T 2048 8192 --H 4 --K 128 --V 256 --backends chunk ;;
    triton) run triton 540 python3 benchmarks/bench_gla_triton.py --sdpa flash cudnn --shapes 16x128x128 --decode-batch 64 --out "$OUT/gla_triton.jsonl" ;;
    triton-decode) run triton-decode 120 python3 benchmarks/bench_gla_triton.py --decode-only --out "$OUT/gla_decode.jsonl" ;;
    tune-rules)  # the GEMV tiling on wider models and the FUSED_STEP_MAX_ROWS crossover (docs/tuning.md)
      run tune-wide 200 python3 benchmarks/tune_decode_block.py --shapes wide
      run tune-rows 200 python3 benchmarks/tune_decode_block.py --shapes wide --rows 1,2,4,8,12,16,32 ;;
    triton2) run triton2 540 python3 benchmarks/bench_gla_triton.py --no-sdpa --shapes 4x256x512 --decode-batch 64 --out "$OUT/gla_triton2.jsonl" ;;
    triton-profile) run triton-profile 120 python3 benchmarks/profile_gla_triton.py --no-fla ;;
    decode) run decode 570 python3 -m longseq bench decode --models gla,transformer,megabyte:paper95m --presets 85m --contexts 4096,16384 --batch-sizes 1,32,max --max-batch 512 --policies full,tova:ctx/8 --gen-tokens 64 --compile --against hf --memory-limit-gib 40 --jsonl "$OUT/decode.jsonl" ;;
    decode-b1) run decode-b1 240 python3 -m longseq bench decode --models gla,transformer,megabyte:paper95m --presets 85m --contexts 4096 --batch-sizes 1 --policies full,tova:ctx/8 --gen-tokens 64 --compile --jsonl "$OUT/decode_b1.jsonl" ;;
    decode-smollm2) run decode-smollm2 480 python3 -m longseq bench decode --models transformer --presets smollm2-135m --contexts 4096 --batch-sizes 1,max --max-batch 256 --policies full,tova:ctx/8 --gen-tokens 64 --compile --against hf --memory-limit-gib 40 --jsonl "$OUT/decode_smollm2.jsonl" ;;
    decode-fused) run decode-fused 240 python3 -m longseq bench decode --models gla,transformer,megabyte:paper95m --presets 85m --contexts 4096 --batch-sizes 1 --policies full,tova:ctx/8 --gen-tokens 64 --fused --jsonl "$OUT/decode_fused.jsonl" ;;
    bench) run bench 420 python3 -m longseq bench --device cuda --models gla,transformer --presets medium --seq-lens 2048,8192 --batch-tokens 16384 --steps 5 --warmup 2 --json "$OUT/bench.json" ;;
    bench-compile)  # one length per step: compiling GLA medium whole took over 150 s on an H200 (session 27); since
      # session 28 --compile compiles each block (one layer's graph): a GLA-only 2K process took 47 s on an H100 (session 29)
      run bench-compile 560 python3 -m longseq bench --device cuda --models gla,transformer --presets medium --seq-lens 2048 --batch-tokens 16384 --steps 5 --warmup 2 --compile --json "$OUT/bench_compile.json" ;;
    bench-compile-8k) run bench-compile-8k 560 python3 -m longseq bench --device cuda --models gla,transformer --presets medium --seq-lens 8192 --batch-tokens 16384 --steps 5 --warmup 2 --compile --json "$OUT/bench_compile_8k.json" ;;
    compile-time) run compile-time 450 python3 benchmarks/compile_time.py --model gla --preset medium --batch 8 --seq-len 2048 --steps 5 ;;
    train-profile)
      run train-profile-gla 200 python3 benchmarks/profile_train.py --model gla --json "$OUT/train_profile_gla.json"
      run train-profile-transformer 200 python3 benchmarks/profile_train.py --model transformer --json "$OUT/train_profile_transformer.json" ;;
    megabyte) run megabyte 420 python3 benchmarks/bench_megabyte.py --device cuda --json "$OUT/megabyte.json" ;;
    megabyte-fused) run megabyte-fused 300 python3 benchmarks/bench_megabyte.py --device cuda --fused --module-step --steps 0 --json "$OUT/megabyte_fused.json" ;;
    megabyte-compile) run megabyte-compile 300 python3 benchmarks/bench_megabyte.py --device cuda --compile --gen-bytes 0 --ref-gen-bytes 0 --json "$OUT/megabyte_compile.json" ;;
    cache) run cache 300 python3 benchmarks/bench_cache_decode.py --json "$OUT/cache_decode.json" ;;
    hf) run hf 420 python3 benchmarks/bench_hf_cache.py --memory-limit-gib 40 --out "$OUT/hf_cache" ;;
    decode-bounded) run decode-bounded 240 python3 -m longseq bench decode --models transformer --presets 85m --contexts 4096 --batch-sizes 1,max --max-batch 512 --policies full,window:ctx/8,h2o:ctx/8,tova:ctx/8 --gen-tokens 64 --compile --memory-limit-gib 40 --jsonl "$OUT/decode_bounded.jsonl" ;;
    decode-hybrid) run decode-hybrid 330 python3 -m longseq bench decode --models hybrid,transformer,gla --presets 85m --contexts 4096,16384 --batch-sizes 1,max --max-batch 512 --policies full,tova:ctx/8 --gen-tokens 64 --compile --memory-limit-gib 40 --jsonl "$OUT/decode_hybrid.jsonl" ;;
    recall)  # reproduce.py's eval-recall stage (RECALL_ARGS: e.g. --recall-parts mqar), resuming from the committed results
      mkdir -p /tmp/repro/results && cp -n benchmarks/results/repro-2026-11-26/recall.json /tmp/repro/results/ 2>/dev/null
      run recall 570 python3 benchmarks/reproduce.py --out /tmp/repro --stage eval-recall ${RECALL_ARGS:-}
      cp -r /tmp/repro/results/recall.json /tmp/repro/results/stage-eval-recall.json /tmp/repro/results/recall_passkey "$OUT/" 2>/dev/null ;;
    prefill) run prefill 200 python3 benchmarks/bench_prefill.py --contexts 2048 4096 --batch-sizes 1 16 --out "$OUT/prefill.jsonl" ;;
    prefill-smollm2) run prefill-smollm2 120 python3 benchmarks/bench_prefill.py --model "$GGUF" --text "$WORKS/hamlet.txt" --contexts 2048 4096 --batch-sizes 1 16 --out "$OUT/prefill_smollm2.jsonl" ;;
    passkey-smollm2) run passkey-smollm2 240 python3 -m longseq eval "$GGUF" --task passkey --lengths 2048,4096 --policies full,window,sink,h2o,tova --budgets ctx/16,ctx/8,ctx/4,ctx/2 --trials 5 --filler repeat --batch-size 25 --out "$OUT/passkey_repeat" ;;
    sweep-smollm2) for L in 2048 4096; do run sweep-smollm2-$L 150 python3 -m longseq eval "$GGUF" --data $(printf "$WORKS/%s.txt " $SWEEP_WORKS) --seq-len $L --policies window,sink,h2o,tova,tova_head --budgets $((L / 16)),$((L / 8)),$((L / 4)),$((L / 2)) --no-progress --out-dir "$OUT/sweep_$L"; done ;;
    *) echo "unknown step $s" ;;
  esac
done
