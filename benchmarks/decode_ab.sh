#!/usr/bin/env bash
# Decode speed of two source trees side by side on one GPU, alternating A/B twice, one JSONL per run:
#   BASE=path/to/other/src OUT=dir bash benchmarks/decode_ab.sh [extra `longseq bench decode` args]
# "base" runs the tree at $BASE (e.g. `git archive <commit> src | tar -x -C /tmp/base`), "new" this
# checkout's src/. Every model and cache policy at batch 1 and a 4K prompt, captured (CUDA graph) decode.
set -u
: "${BASE:?set BASE to the src/ folder of the tree to compare against}"
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
args=(bench decode --models gla,transformer,megabyte:paper95m --presets 85m --contexts 4096 --batch-sizes 1
      --policies full,window:ctx/8,sink:ctx/8,h2o:ctx/8,tova:ctx/8 --gen-tokens 128 --compile "$@")
for rep in ${REPS:-1 2}; do
  for side in base new; do
    src=$BASE
    [ "$side" = new ] && src=$PWD/src
    echo "=== $side rep $rep ($src)"
    PYTHONPATH=$src timeout 280 python3 -m longseq "${args[@]}" --jsonl "$OUT/decode_${side}_$rep.jsonl" \
      >"$OUT/decode_${side}_$rep.log" 2>&1
    echo "exit $?"
  done
done
