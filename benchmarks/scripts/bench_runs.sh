#!/usr/bin/env bash
# The `infir2 bench` runs of benchmarks/ (FP8 vs BF16, fidelity, profiles, memory, the full 7B recipe), on a host with
# 1-2 H200s after `bash benchmarks/scripts/gpu_runs.sh setup`. Each step is a function; steps named `NAME@G` run on
# GPU G (default 0); `a+b` runs two steps side by side (use different GPUs for benches):
#   bash benchmarks/scripts/bench_runs.sh A@0+convert@1 B@0+E@1 collect
# Every bench writes to $EV/exp/<name>/ (bench.json after each variant, table.md, PNGs); `collect` packs all
# benches' small files and every table into $OUT (results.tgz, tables.md), so a call that is cut short still
# returns what was measured if it ends with `collect`.
set -uo pipefail
EV=${EV:-/tmp/ev}
OUT=${OUT:-$EV/out}
export INFIR2_EXP_ROOT=$EV/exp PYTHONUNBUFFERED=1 PATH="$HOME/.local/bin:$PATH"
mkdir -p "$EV" "$OUT" "$INFIR2_EXP_ROOT" "$EV/console"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$EV/steps.txt"; }

C=benchmarks/bench_candidates.yaml
B=(infir2 bench --timeout-minutes 5 --variants-file "$C")
[ -n "${DRY:-}" ] && B+=(--dry-run)  # DRY=1: validate every bench here, run nothing
S7=(--recipe 7b --layers 8 --seq 8192)
Q=(--steps 12 --warmup-steps 3)   # screening length: 15 iterations, 12 timed
bench() { local name=$1; shift; log "bench $name: $*"; "${B[@]}" "$@" --exp-name "$name" >"$EV/console/$name.txt" 2>&1; log "bench $name: exit $?"; }

# The built-in variants (the seed's FP8 flags against BF16), 20 timed steps.
step_A() { bench b7-A "${S7[@]}" --variants bf16,fp8-blockwise,fp8-tensorwise; }
# BF16 at its best against FP8 candidates: fused cross-entropy, gradient-accumulation fusion, micro batch 2.
step_B() { bench b7-B "${S7[@]}" "${Q[@]}" --baseline bf16-ce \
  --variants bf16-ce,bf16-ce-wgrad,fp8-ce,fp8-ce-wgrad,bf16-ce-mbs2,fp8-ce-mbs2; }
# 16 layers: the FP8-able share of the FLOPs grows from 70.5 % to 78.6 %.
step_D() { bench b7-D --recipe 7b --layers 16 --seq 8192 "${Q[@]}" --baseline bf16-ce --variants bf16-ce,fp8-ce,fp8-ce-wgrad; }
# Qwen2.5-1.5B as the recipe has it (28 layers, tied embeddings), seq 8192, alone on the host (run E of
# the first 1.5B run ran beside a 7B bench and was disturbed). The built-ins carry the recipes' fusions; *-seedflags not.
step_E() { bench b15-E2 --recipe 1.5b --seq 8192 "${Q[@]}" --variants bf16,fp8-blockwise,bf16-seedflags,fp8-seedflags; }
# The same with untied embeddings (the GPU probe's 1.5B was untied).
step_U() { bench b15-U --recipe 1.5b --seq 8192 "${Q[@]}" --set model.untie_embeddings=true --variants bf16,fp8-blockwise; }
# Where the 1.5B step goes.
step_P() { bench b15-P --recipe 1.5b --seq 8192 --steps 6 --warmup-steps 3 --profile --variants bf16,fp8-blockwise; }
# What is live at the memory peak, by phase and call site (the allocator's history; slows the steps).
step_M() { bench b7-M "${S7[@]}" --steps 2 --warmup-steps 2 --memory-snapshot --variants bf16,fp8-blockwise; }
# Next: does FP8 with BF16 parameters (master weights as remainders again) use less memory, and at what speed?
step_M2() { bench b7-M2 "${S7[@]}" --steps 2 --warmup-steps 2 --memory-snapshot --baseline bf16-ce \
  --variants bf16-ce,fp8-ce,fp8-ce-noparamgather; }
step_N() { bench b7-N "${S7[@]}" "${Q[@]}" --baseline bf16-ce --variants bf16-ce,fp8-ce,fp8-ce-noparamgather; }
# Next: the host side of the 1.5B FP8 step (CUDA graphs, Python GC every 100 steps), alone on the host.
step_S() { bench b15-S --recipe 1.5b --seq 8192 "${Q[@]}" \
  --variants bf16,fp8-blockwise,bf16-cudagraph,fp8-cudagraph,bf16-gc,fp8-gc; }
# Where a step's time goes (PyTorch profiler, 3 iterations after the warm-up).
step_G() { bench b7-G "${S7[@]}" --steps 6 --warmup-steps 3 --profile --baseline bf16-ce --variants bf16-ce,fp8-ce; }
# Screening of the remaining candidates beside fp8-ce.
step_I() { bench b7-I "${S7[@]}" "${Q[@]}" --baseline fp8-ce \
  --variants fp8-ce,fp8-ce-gc,fp8-ce-nonancheck,fp8-ce-noparamgather,fp8-ce-attn-fused; }
step_K() { bench b7-K "${S7[@]}" "${Q[@]}" --baseline bf16-ce-bf16states \
  --variants bf16-ce-bf16states,fp8-ce-bf16states,fp8-ce-nopao,fp8-ce-cudagraph; }

# The full 7B recipe (28 layers, seq 32768, TP 4, sequence parallel, the recipe's FP8 flags) on 4 GPUs
# (DP 1) and 8 GPUs (DP 2); mock data and 8 micro-batches per DP rank per step (GBS 8 / 16) instead of the
# recipe's GBS 128, so that 13 iterations fit a 10-minute call. `*seed` adds the seed's own flags (no fusions).
FULL=(--recipe 7b --tensor-parallel 4 --steps 10 --warmup-steps 3)
step_full4() { bench b7-full-tp4 "${FULL[@]}" --nproc-per-node 4 --variants bf16,fp8-blockwise; }
step_full4seed() { bench b7-full-tp4-seed "${FULL[@]}" --nproc-per-node 4 --baseline bf16-seedflags \
  --variants bf16-seedflags,fp8-seedflags; }
step_full8() { bench b7-full-tp4-dp2 "${FULL[@]}" --nproc-per-node 8 --variants bf16,fp8-blockwise; }

# The fidelity corpus: 60 MB of generated English-like text, its 32k BPE tokenizer, prepare-data.
step_data() {
  local d=$EV/data; mkdir -p "$d"
  log "data: corpus, tokenizer, prepare-data"
  python3 scripts/make_toy_corpus.py --output "$d/toy.jsonl" --size-mb 60 --tokenizer-dir "$d/toy-tokenizer" \
    --vocab-size 32000 --tokenizer-sample-mb 10 >"$EV/console/data.txt" 2>&1
  infir2 prepare-data --input "$d/toy.jsonl" --tokenizer "$d/toy-tokenizer" --output-prefix "$d/toy" --workers 8 --force \
    >>"$EV/console/data.txt" 2>&1
  log "data: exit $? $(ls -la "$d" | grep -c text_document) files"
}
# FP8 (the seed's flags) against BF16: 500 iterations of the tiny recipe on the corpus, same seed and samples.
step_H() {
  [ -f "$EV/data/toy_text_document.idx" ] || step_data
  bench fid-H --fidelity --recipe tiny --data "$EV/data/toy_text_document" --tokenizer "$EV/data/toy-tokenizer" \
    --steps 500 --variants bf16,fp8-blockwise,fp8-ce-wgrad
}
# The conversion proof (convert_proof.sh) on this step's GPU, its reports under $EV/cp.
step_convert() {
  local cp=$EV/cp
  EV=$cp OUT=$cp/out bash benchmarks/scripts/convert_proof.sh models convert logits roundtrip cpt export final \
    >"$EV/console/convert.txt" 2>&1
  log "convert: exit $?"
}

step_collect() {
  log "collect"
  (cd "$EV" && for t in exp/*/table.md; do [ -f "$t" ] && { echo "## ${t%/table.md}"; cat "$t"; echo; }; done) >"$OUT/tables.md"
  (cd "$EV" && tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='torch_profile' steps.txt console \
     $(ls -d exp/*/bench.json exp/*/table.md exp/*/*.png exp/*/*/bench-console.log exp/*/*/launch.sh 2>/dev/null) \
     $(ls -d cp/reports 2>/dev/null))
  cp "$EV/steps.txt" "$OUT/steps.txt"
  [ -f "$EV/cp/reports/convert_proof.json" ] && cp "$EV/cp/reports/convert_proof.json" "$OUT/"
  ls -la "$OUT"
}

run_on() {  # STEP[@GPU] (a step without @ sees every GPU when it is a multi-GPU step, else GPU 0)
  local step=${1%@*}
  if [[ $1 == *@* ]]; then CUDA_VISIBLE_DEVICES=${1#*@} "step_$step"
  elif [[ $step == full* ]]; then "step_$step"
  else CUDA_VISIBLE_DEVICES=0 "step_$step"; fi
}

for item in "$@"; do
  if [[ $item == *+* ]]; then
    run_on "${item%%+*}" & first=$!
    sleep 5  # the two launchers each pick a free rendezvous port: not at the same instant
    run_on "${item#*+}"
    wait $first
  else
    run_on "$item"
  fi
done
