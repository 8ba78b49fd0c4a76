#!/usr/bin/env bash
# Several-GPU training check (issue 10): one GPU vs DDP vs FSDP2 on 2 GPUs with the same global batch,
# cross-world-size resume, throughput and peak memory. Logs and run dirs under $OUT (default ./multi-gpu).
#   bash benchmarks/multi_gpu.sh [MODELS...]        default: gla transformer (the ~355M `medium` presets)
set -u
OUT=${OUT:-multi-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# NVLink multicast stays off on shared hosts (the device tool's KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STEPS=${STEPS:-200}
COMMON=(--preset "${PRESET:-medium}" --seq-len "${SEQ:-2048}" --batch-size 8 --steps "$STEPS" --warmup 20 --lr 6e-4 --eval-every 0
        --eval-tokens 65536 --log-every 10 --seed 0 --no-progress --device "${DEVICE:-cuda}")
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(gla transformer)
step() {  # step NAME CMD...
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$OUT/summary.log"
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/summary.log"
}
for m in "${models[@]}"; do
  step "$m-1gpu" python3 -m longseq train --model "$m" "${COMMON[@]}" --out "$OUT/$m-1gpu" --overwrite
  step "$m-ddp" torchrun --standalone --nproc-per-node 2 -m longseq train --model "$m" "${COMMON[@]}" \
    --parallel ddp --out "$OUT/$m-ddp" --overwrite
  step "$m-fsdp" torchrun --standalone --nproc-per-node 2 -m longseq train --model "$m" "${COMMON[@]}" \
    --parallel fsdp --out "$OUT/$m-fsdp" --overwrite
  # A 2-rank FSDP checkpoint continues on 1 rank, and a 1-rank checkpoint on 2 ranks (DDP); checked on
  # the first model only (the checkpoint code does not depend on the model kind).
  [ "$m" = "${models[0]}" ] || { python3 -m longseq plot "$OUT/$m-1gpu" "$OUT/$m-ddp" "$OUT/$m-fsdp" \
    -o "$OUT/$m-loss.png" >>"$OUT/summary.log" 2>&1; continue; }
  step "$m-fsdp-to-1" python3 -m longseq train --out "$OUT/$m-fsdp" --resume --steps $((STEPS + 10)) --no-progress
  step "$m-1-to-ddp" torchrun --standalone --nproc-per-node 2 -m longseq train --out "$OUT/$m-1gpu" --resume \
    --steps $((STEPS + 10)) --parallel ddp --no-progress
  python3 -m longseq plot "$OUT/$m-1gpu" "$OUT/$m-ddp" "$OUT/$m-fsdp" -o "$OUT/$m-loss.png" >>"$OUT/summary.log" 2>&1
done
python3 - "$OUT" "${models[@]}" <<'PY' | tee -a "$OUT/summary.log"
import json, sys
from pathlib import Path
out, models = Path(sys.argv[1]), sys.argv[2:]
print("| model | run | GPUs | tok/s (total) | tok/s per GPU | peak GiB (rank 0) | loss@50 | loss@100 | loss@200 "
      "| max abs loss diff vs 1 GPU |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
def losses(m, run):
    f = out / f"{m}-{run}" / "metrics.jsonl"
    rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.exists() else []
    return {r["step"]: r["loss"] for r in rows if "tok_s" in r and r["step"] <= 200}
for m in models:
    for run, gpus in (("1gpu", 1), ("ddp", 2), ("fsdp", 2)):
        f = out / f"{m}-{run}" / "metrics.jsonl"
        if not f.exists():
            print(f"| {m} | {run} | {gpus} | missing | | | | | |"); continue
        rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        train = [r for r in rows if "tok_s" in r and r["step"] <= 200]
        loss = {r["step"]: r["loss"] for r in train}
        steady = [r["tok_s"] for r in train if r["step"] > 20]  # after warm-up/compilation
        tok = sum(steady) / max(len(steady), 1)
        peak = max((r.get("peak_mem_gib", 0) for r in train), default=0)
        fmt = lambda s: f"{loss[s]:.4f}" if s in loss else "-"
        ref = losses(m, "1gpu")
        diff = max((abs(loss[s] - ref[s]) for s in loss if s in ref), default=float("nan"))
        print(f"| {m} | {run} | {gpus} | {tok:,.0f} | {tok / gpus:,.0f} | {peak:.1f} | {fmt(50)} | {fmt(100)} "
              f"| {fmt(200)} | {diff:.4f} |")
PY
