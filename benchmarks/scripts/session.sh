#!/usr/bin/env bash
# One GPU session (nvidia-h200-x2: plan `run`, lanes per GPU; nvidia-h200: plan `run1`, the steps in a row), run as a
# daemon that outlives each device call, so that staging, installing and every measurement share one machine and a
# call only looks in and collects:
#   bash benchmarks/scripts/session.sh prepbg        # CPU only, in the background: text gathered on the host, prepared
#                                             # with the Qwen tokenizer (needs w/ staged: megatron-core)
#   bash benchmarks/scripts/session.sh start         # (after the last staging call) install, then both lanes, in the background
#                                             # (PLAN=run1: the one-GPU plan, for nvidia-h200)
#   bash benchmarks/scripts/session.sh poll 540      # wait up to 540 s (or until done), then pack results into $OUT
# Staging, each call's upload under 64 MiB (the tree is about 5.5 MB, each .gpu-stage/cN 46 MB), back to back:
#   call 1 carries .gpu-stage/w .gpu-stage/c1 .gpu-data/wheels:        session.sh stage
#   call 2 carries .gpu-stage/c2 .gpu-data/qwen-tokenizer:             session.sh stage prepbg
#   calls 3-5 carry .gpu-stage/c3 .. c5:                               session.sh stage
#   call 6 carries .gpu-stage/c6:                                      [PLAN=run1] session.sh stage start poll 480
# `stage` copies what a call carried to /tmp/gpu-stage and /tmp/gpu-data, where later steps look for it.
# The machine goes back after about 30 s without a call: send each poll as soon as the last returns (a poll that
# lands on a fresh machine says so and returns at once).
# Lanes of `run`: GPU 0 times benches (7B shape, 1.5B, then DP 2 memory on both GPUs); GPU 1 runs several tiny-model
# jobs at once: the base model and the fidelity from it (and when asked: the stop proof, its decays and `infir2 eval`,
# the master-weight proof, the CPT comparison and the held-out evaluations). Each step logs one line to $W/res/steps.txt; results go to $W/res.
# DRY=1 runs every infir2 command of the plan with --dry-run on the CPU (what the tests do).
set -uo pipefail
W=${W:-/tmp/w}
RES=$W/res
DATA=$W/data
TOK=${TOK:-$W/qwen-tokenizer}
GD=${GD:-/tmp/gpu-data}  # the staged tokenizer and wheels (step stage)
export INFIR2_EXP_ROOT=$W/exp PYTHONUNBUFFERED=1 PATH="$HOME/.local/bin:$PATH"
mkdir -p "$RES" "$DATA" "$INFIR2_EXP_ROOT" "$RES/console"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$RES/steps.txt"; }
DRYF=()
[ -n "${DRY:-}" ] && DRYF=(--dry-run)
C=benchmarks/bench_candidates.yaml

# ---- the text every GPU run here trains on: source and documentation files of the host's Python packages
TEXT=(--set data.mock=false --set "data.blend=[{path: $DATA/train_text_document, weight: 1.0}]"
      --set data.split=98,2,0 --set tokenizer.type=HuggingFaceTokenizer --set "tokenizer.model=$TOK"
      --set model.vocab_size=151669 --set logging.eval_interval=100 --set logging.eval_iters=8)
BASE_SCHEDULE=(--set schedule.train_iters=1000 --set schedule.warmup_iters=100 --set schedule.decay_iters=200
               --set checkpoint.save_interval=200)
CPT_SCHEDULE=(--set schedule.train_iters=500 --set schedule.warmup_iters=50 --set schedule.decay_iters=100
              --set schedule.lr=5e-4 --set schedule.min_lr=5e-5 --set checkpoint.save_interval=100
              --set checkpoint.keep_last=1 --set checkpoint.keep_every=200)  # the disk holds ~30 of them
PRETRAINED=(--set "checkpoint.pretrained=$INFIR2_EXP_ROOT/base/checkpoints")
# The base run's retention (the last 2 and every 400th: 200 and 600 go, 400/800/1000 stay) and held-out set
KEEP=(--set checkpoint.keep_last=2 --set checkpoint.keep_every=400)
HELDOUT=(--set "data.valid_blend=[{path: $DATA/heldout_text_document, weight: 1.0}]")
BASE=(--set precision.fp8=null "${TEXT[@]}" "${BASE_SCHEDULE[@]}" "${HELDOUT[@]}")

step_prep() {
  log "prep: megatron-core and infir2 (no TE yet), text, prepare-data"
  python3 -m pip install -q --no-index --no-deps --no-compile /tmp/gpu-stage/w/megatron_core-*.whl >/dev/null 2>&1
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
  cp -r "$GD/qwen-tokenizer" "$TOK" 2>/dev/null
  python3 benchmarks/scripts/gather_text.py --out "$DATA" --train-mb 200 --heldout-percent 2 \
    /opt/torch/.venv/lib/python3.12/site-packages /usr/lib/python3* >"$RES/console/gather.txt" 2>&1
  for split in train heldout; do
    infir2 prepare-data --input "$DATA/$split.jsonl" --tokenizer "$TOK" \
      --output-prefix "$DATA/$split" --workers "$(nproc)" --force >"$RES/console/prepare-$split.txt" 2>&1
  done
  log "prep: $(cat "$DATA/gather.json" 2>/dev/null) $(ls "$DATA" | tr '\n' ' ')"
  # prepare-data against the tokenizer's own speed on this host's CPUs, while they are idle (before the build)
  python3 -m pip install -q --no-index --no-deps "$GD"/wheels/zstandard-*.whl >/dev/null 2>&1
  python3 benchmarks/scripts/prepare_data_speed.py --input "$DATA/train.jsonl" --tokenizer "$TOK" \
    --workers 1,8,16 --per-worker-mb 12 --out "$RES/prepare_data_speed" >"$RES/console/prepare_data_speed.txt" 2>&1
  log "prepare-data speed: exit $?"
  touch "$RES/PREP_DONE"
}

step_install() {
  log "install: TE, megatron-core, infir2"
  bash /tmp/gpu-stage/w/install.sh >"$RES/console/install.txt" 2>&1
  python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$RES/console/install.txt" 2>&1
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv >>"$RES/steps.txt"
  python3 -c "import torch, transformer_engine as te, megatron.core as mc; print('torch', torch.__version__, 'TE', te.__version__, 'mcore', mc.__version__, 'gpus', torch.cuda.device_count())" >>"$RES/steps.txt" 2>&1
  log "install: done"
}

bench() {  # NAME ARGS...: one infir2 bench (its variants one after the other); BENCH_TIMEOUT minutes per variant
  local name=$1; shift
  log "bench $name: $*"
  infir2 bench --timeout-minutes "${BENCH_TIMEOUT:-5}" --variants-file "$C" --exp-name "$name" "${DRYF[@]}" "$@" \
    >"$RES/console/$name.txt" 2>&1
  log "bench $name: exit $?"
}
S7=(--recipe 7b --layers 8 --seq 8192)
Q=(--steps 8 --warmup-steps 3)
Q15=(--steps 8 --warmup-steps 5)  # CUDA graphs are captured after Megatron's 3 warm-up iterations

# ---- lane A (GPU 0; DP 2 uses both): speed and memory
# fp8-blockwise is the recipe as shipped (since 2026-11-30-h200x2-4: the FP8 head with an FP8 weight at 7B, the
# SwiGLU input in blockwise FP8, remainders, the exact options); fp8-exact the recipe before its lossy options;
# the seed's BF16 for the like-for-like ratios; the MLPs through Transformer Engine's operation fuser (fused
# quantization) with Megatron's overlapped parameter gather off, which stopped it there, in both precisions.
# A variant takes about 1.5 minutes here; 3 minutes stop one that hangs (the op fuser's crash did, 2026-11-30-h200x2-4)
# (2026-11-30-h200x2-5: the op fuser 0.795x at 7B, 0.908x at 1.5B, without the blockwise store's memory;
# 2026-11-30-h200x2-6: the lean loss, now the recipes', 0.800x / 1.021x of BF16 with it at 7B, 0.975x at DP 2);
# next: the recipes as shipped against BF16 with the same loss, and against both with Megatron's fused loss
step_A15() { BENCH_TIMEOUT=3 bench b15 --recipe 1.5b --seq 8192 --micro-batch 2 "${Q15[@]}" \
  --variants "${A15:-bf16,fp8-blockwise,bf16-seedflags}"; }
step_A7() { BENCH_TIMEOUT=3 bench b7 "${S7[@]}" "${Q[@]}" \
  --variants "${A7:-bf16,fp8-blockwise,bf16-seedflags,bf16-nativeloss,fp8-nativeloss}"; }
step_Amem() {  # what is live at the 7B shape's peak, by phase and call site (memory mode: its times are not used)
  bench b7-mem "${S7[@]}" --steps 2 --warmup-steps 2 --memory-snapshot --variants "${AMEM:-bf16,fp8-blockwise}"
}
step_ATP2() {  # the 1.5B recipe's own layout (TP 2, sequence parallel) on both GPUs: the shipped FP8 options under TP
  CUDA_VISIBLE_DEVICES=0,1 bench b15-tp2 --recipe 1.5b --seq 8192 --steps 6 --warmup-steps 3 --nproc-per-node 2 \
    --variants bf16,fp8-blockwise
}
step_ADP2() {  # data parallel 2 (TP 1) on both GPUs: memory clean, GPU 1 shared with what lane B still runs
  CUDA_VISIBLE_DEVICES=0,1 bench b7-dp2 "${S7[@]}" --steps 4 --warmup-steps 3 --nproc-per-node 2 --tensor-parallel 1 \
    --variants "${ADP2:-bf16,fp8-blockwise}"
}

step_swiglu_check() {  # one SwiGLU call of the 7B and the 1.5B shape: compiled against eager, each against Megatron's
  log "swiglu store check"
  if [ -n "${DRY:-}" ]; then
    python3 benchmarks/scripts/swiglu_store_check.py --help >/dev/null
    log "swiglu store check: dry $?"
    return
  fi
  python3 benchmarks/scripts/swiglu_store_check.py --out "$RES/swiglu-7b" --rows 8192 --ffn 18944 \
    >"$RES/console/swiglu-7b.txt" 2>&1
  log "swiglu store check 7b: exit $?"
  python3 benchmarks/scripts/swiglu_store_check.py --out "$RES/swiglu-1.5b" --rows 16384 --ffn 8960 \
    >"$RES/console/swiglu-1.5b.txt" 2>&1
  log "swiglu store check 1.5b: exit $?"
}

# ---- lane B (GPU 1)
step_Bconvert() {  # HF -> Megatron -> 30 FP8 CPT iterations with the tiny recipe (which is the 7B recipe's FP8: the
  # head an FP8 parameter) -> HF: the export loads in transformers, its logits match the trained checkpoint's
  log "convert proof"
  if [ -n "${DRY:-}" ]; then
    EV=$W/cp OUT=$RES/convert bash benchmarks/scripts/convert_proof.sh cpt >"$RES/console/convert.txt" 2>&1
    log "convert proof: dry $?"; return
  fi
  EV=$W/cp OUT=$RES/convert bash benchmarks/scripts/convert_proof.sh models convert cpt export final \
    >"$RES/console/convert.txt" 2>&1
  log "convert proof: exit $?"
}
step_Bstop() {
  log "stop proof"
  if [ -n "${DRY:-}" ]; then infir2 train --recipe tiny --exp stop-dry --dry-run >/dev/null; log "stop proof: dry $?"; return; fi
  python3 benchmarks/scripts/stop_proof.py --out "$RES/stop" --cases "${STOP_CASES:-async-after,async-during,request}" \
    >"$RES/console/stop.txt" 2>&1
  log "stop proof: exit $?"
}
train() {  # NAME ARGS...: infir2 train, console to $RES/console/NAME.txt ($CONSOLE instead, if set)
  local name=$1; shift
  log "train $name"
  infir2 train --recipe tiny --exp "$name" "${DRYF[@]}" "$@" >"$RES/console/${CONSOLE:-$name}.txt" 2>&1
  log "train $name: exit $?"
}
step_Bbase() {  # the base model worth continuing: BF16 on the text, with the retention policy and the held-out set
  train base "${BASE[@]}" "${KEEP[@]}" --rdzv-endpoint localhost:29511
}
decay_of_base() {  # NAME ITERATION PORT: a decay of base from that stable checkpoint, saving every 50 iterations
  local name=$1 it=$2 port=$3
  log "decay $name from $it"
  infir2 decay --recipe tiny --exp "$name" --stable-exp base --load "$it" "${DRYF[@]}" "${BASE[@]}" \
    --set checkpoint.save_interval=50 --set checkpoint.keep_last=4 --rdzv-endpoint "localhost:$port" \
    >"$RES/console/$name.txt" 2>&1
  log "decay $name: exit $?"
}
step_Bretain() {  # two decays from different stable iterations, `infir2 eval` over base and both, table and plot
  local p=() r=$RES/retention
  mkdir -p "$r"
  decay_of_base base-d400 400 29512 & p+=($!)
  decay_of_base base-d800 800 29513 & p+=($!)
  wait "${p[@]}"
  log "eval base and its decays"
  # --recipe and the sets are what base/recipe.yaml records; stated so that the dry run can check the command
  infir2 eval base --recipe tiny "${BASE[@]}" --eval-iters 32 --png "$r/heldout-loss.png" "${DRYF[@]}" \
    >"$RES/console/eval.txt" 2>&1
  log "eval: exit $?"
  [ -n "${DRY:-}" ] && return
  for e in base base-d400 base-d800; do infir2 checkpoints "$e" >"$r/checkpoints-$e.txt" 2>&1; done
  infir2 checkpoints base --prune --dry-run >"$r/prune-dry-run-base.txt" 2>&1
  cp "$INFIR2_EXP_ROOT/base/logs/retention.log" "$r/" 2>/dev/null
  grep -h "disk forecast\|infir2.retention" "$RES/console/base.txt" >"$r/base-forecast-and-pruning.txt" 2>/dev/null
  log "retention/eval: $(ls "$INFIR2_EXP_ROOT/base/checkpoints" | tr '\n' ' ')"
}
masters_probe() {  # NAME ARGS...: a first launch from the base model that reports and dumps its masters, then exits
  local name=$1; shift
  INFIR2_MASTERS_REPORT=$RES/masters/$name.json INFIR2_MASTERS_DUMP=$W/masters/$name.pt INFIR2_EXIT_AFTER_LOAD=1 \
    train "$name" "${TEXT[@]}" "${CPT_SCHEDULE[@]}" "${PRETRAINED[@]}" "$@"
}
# `wait PID...` only: a bare `wait` would also wait for the other lane
step_Bmasters() {
  local p=()
  masters_probe m-fixed --rdzv-endpoint localhost:29521 & p+=($!)
  masters_probe m-today --set checkpoint.masters_from_pretrained=false --rdzv-endpoint localhost:29522 & p+=($!)
  masters_probe m-bf16 --set precision.fp8=null --rdzv-endpoint localhost:29523 & p+=($!)
  wait "${p[@]}"
}
step_Bcpt() {  # 500 CPT iterations from the base model: FP8 (fixed masters, and today's), BF16; same data and seed
  local p=()
  train cpt-fp8 "${TEXT[@]}" "${CPT_SCHEDULE[@]}" "${PRETRAINED[@]}" --rdzv-endpoint localhost:29531 & p+=($!)
  train cpt-fp8-today "${TEXT[@]}" "${CPT_SCHEDULE[@]}" "${PRETRAINED[@]}" \
    --set checkpoint.masters_from_pretrained=false --rdzv-endpoint localhost:29532 & p+=($!)
  train cpt-bf16 "${TEXT[@]}" "${CPT_SCHEDULE[@]}" "${PRETRAINED[@]}" --set precision.fp8=null \
    --rdzv-endpoint localhost:29533 & p+=($!)
  wait "${p[@]}"
}
dump_at() {  # EXP ITERATION PORT [ARGS]: load that checkpoint of the run, dump its masters, exit
  local exp=$1 it=$2 port=$3; shift 3
  INFIR2_MASTERS_DUMP=$W/masters/$exp-$it.pt INFIR2_EXIT_AFTER_LOAD=1 CONSOLE=dump-$exp-$it \
    train "$exp" "${TEXT[@]}" "${CPT_SCHEDULE[@]}" "${PRETRAINED[@]}" --rdzv-endpoint "localhost:$port" "$@" \
    -- --ckpt-step "$it"
}
step_Bdump() {  # one experiment's dumps one after the other (its lock)
  local p=()
  { dump_at cpt-fp8 200 29541; dump_at cpt-fp8 500 29542; } & p+=($!)
  { dump_at cpt-fp8-today 200 29543 --set checkpoint.masters_from_pretrained=false
    dump_at cpt-fp8-today 500 29544 --set checkpoint.masters_from_pretrained=false; } & p+=($!)
  wait "${p[@]}"
}

step_Beval() {
  log "held-out loss (BF16)"
  [ -n "${DRY:-}" ] && return
  local m=$W/masters e=$INFIR2_EXP_ROOT
  python3 benchmarks/scripts/heldout_loss.py --recipe "$e/base/recipe.yaml" --heldout "$DATA/heldout_text_document" \
    --out "$RES/heldout.json" base="$e/base/checkpoints" \
    fp8-weights-500="$e/cpt-fp8/checkpoints" bf16-500="$e/cpt-bf16/checkpoints" \
    fp8-today-weights-500="$e/cpt-fp8-today/checkpoints" \
    $(for f in "$m"/*.pt; do [ -f "$f" ] && echo "masters-$(basename "$f" .pt)=$f"; done) \
    >"$RES/console/heldout.txt" 2>&1
  log "held-out loss: exit $?"
  python3 benchmarks/scripts/tb_summary.py "$e/cpt-fp8" "$e/cpt-fp8-today" "$e/cpt-bf16" "$e/base" >"$RES/tb-summary.json" 2>/dev/null
  python3 benchmarks/scripts/tb_curves.py --tag "lm loss" --out "$RES/cpt-curves.json" --png "$RES/cpt-loss.png" \
    --smooth 20 \
    --baseline cpt-bf16 "$e/cpt-bf16" "$e/cpt-fp8" "$e/cpt-fp8-today" >"$RES/cpt-final-loss.txt" \
    2>>"$RES/console/heldout.txt"
}
fidelity() {  # NAME VARIANTS [PARALLEL]: 500 steps of the tiny model on the text, each variant against bf16, 3 seeds
  bench "$1" --fidelity --recipe tiny --data "$DATA/train_text_document" --tokenizer "$TOK" --steps 500 \
    --seeds 1236,1237,1238 --parallel "${3:-4}" --variants "$2"
}
# one option at a time: the exact ones (transposes on demand, the projection's BF16 input), then the lossy ones
step_Bfid() { fidelity fid bf16,fp8-blockwise,fp8-exact,fp8-exact-rem; }
# Fidelity from the base model (continual pre-training, the steady test: FP8 and BF16 ended 0.06 % apart there),
# (2026-11-30-h200 and -h200x2-4: the recipe's lossy options within 0.11 % on two seeds; FP8 attention fails in each
# form; the operation fuser +0.09 %; the recipe as shipped +0.11 / +0.02 / +0.10 % on seeds 1236-1238; with the lean
# loss +0.15 / +0.22 % on 1236-1237, h200x2-6): the recipe as shipped, on two seeds
FIDCPT=${FIDCPT:-bf16,fp8-blockwise,bf16-nativeloss,fp8-nativeloss}
fidcpt() {  # NAME SEED
  BENCH_TIMEOUT=15 bench "$1" --fidelity --recipe tiny --data "$DATA/train_text_document" --tokenizer "$TOK" \
    --steps 500 --seed "$2" --parallel 8 --variants "$FIDCPT" "${PRETRAINED[@]}" --set schedule.lr=5e-4 \
    --set schedule.min_lr=5e-5 --set schedule.warmup_iters=50 --set schedule.decay_iters=100 --loss-window 50
}
step_Bremainders() {  # the BF16 parameters' remainders: same masters, 2 bytes per parameter less, save and resume
  log "remainders check"
  if [ -n "${DRY:-}" ]; then python3 benchmarks/scripts/remainders_check.py --out "$RES/remainders" --dry-run \
    >"$RES/console/remainders.txt" 2>&1; log "remainders check: dry $?"; return; fi
  python3 benchmarks/scripts/remainders_check.py --out "$RES/remainders" >"$RES/console/remainders.txt" 2>&1
  log "remainders check: exit $?"
}

lane_A() {  # GPU 0: the 7B shape, 1.5B; then DP 2 and TP 2 on both GPUs (NOTP2=1 skips TP 2, the lean loss's
  # check across tensor-parallel ranks on GPUs; SWIGLU=1: the store's cost
  # per call first)
  if [ -n "${SWIGLU:-}" ]; then CUDA_VISIBLE_DEVICES=0 step_swiglu_check; fi
  CUDA_VISIBLE_DEVICES=0 step_A7
  CUDA_VISIBLE_DEVICES=0 step_A15
  step_ADP2
  if [ -z "${NOTP2:-}" ]; then step_ATP2; fi
  log "lane A done"
}
lane_B() {  # tiny runs: several share GPU 1 at once. Proven on 2026-11-30 and skipped unless asked: the stop proof
  # (STOP=1), retention with decays and `infir2 eval` (RETAIN=1), the masters probes and dumps (MASTERS=1)
  # CPT=1 reruns the 500-iteration CPT curves (benchmarks/2026-11-30-h200x2-3), FIDSCRATCH=1 the from-scratch fidelity
  export CUDA_VISIBLE_DEVICES=1
  local stop= retain= fid= rem=
  if [ -n "${STOP:-}" ]; then step_Bstop & stop=$!; fi
  if [ -n "${FIDSCRATCH:-}" ]; then step_Bfid & fid=$!; fi
  if [ -n "${MASTERS:-}" ]; then step_Bremainders & rem=$!; fi
  # the 7B shape's memory snapshot beside the base model (memory is per process; neither is timed; NOMEM=1 skips it)
  local mem= conv=
  if [ -z "${NOMEM:-}" ]; then step_Amem & mem=$!; fi
  step_Bbase
  touch "$RES/BASE_DONE"
  if [ -n "${RETAIN:-}" ]; then step_Bretain & retain=$!; fi
  step_Bconvert & conv=$!
  [ -n "${MASTERS:-}" ] && step_Bmasters
  fidcpt fidcpt-1236 1236
  FIDCPT=${FIDCPT2:-$FIDCPT} fidcpt fidcpt-1237 1237
  wait $mem $conv
  if [ -n "${CPT:-}" ]; then step_Bcpt; [ -n "${MASTERS:-}" ] && step_Bdump; step_Beval; fi
  wait $stop $retain $fid $rem
  log "lane B done"
}

step_run() {  # everything after the staging, as one background job
  if [ -z "${DRY:-}" ]; then
    # the CPU measurements of prep must not share the host with the build; the data must be there for lane B
    for _ in $(seq 1 60); do [ -f "$RES/PREP_DONE" ] && break; sleep 3; done
    step_install
  fi
  # lane B (GPU 1: the base model, then the fidelity from it) beside lane A (GPU 0); DP 2 last, on both GPUs: its
  # memory is clean, its time shares GPU 1 with what lane B still runs
  lane_B & local b=$!
  lane_A
  wait $b
  touch "$RES/DONE"
  log "session done"
}

# One GPU (nvidia-h200): the timed benches alone on the GPU: the 7B shape, then the base model, the fidelity from it
# beside the conversion proof, 1.5B, and the 7B memory snapshot last (about 28 minutes by 2026-11-30-h200's times).
step_run1() {
  if [ -z "${DRY:-}" ]; then
    for _ in $(seq 1 60); do [ -f "$RES/PREP_DONE" ] && break; sleep 3; done
    step_install
  fi
  export CUDA_VISIBLE_DEVICES=0
  step_A7
  step_Bbase
  touch "$RES/BASE_DONE"
  step_Bconvert & local conv=$!
  fidcpt fidcpt-1236 1236
  wait $conv
  step_A15
  if [ -z "${NOMEM:-}" ]; then step_Amem; fi
  touch "$RES/DONE"
  log "session done"
}

# Data parallel 2 alone (nvidia-h200-x2, PLAN=dp2): install, then the DP 2 bench; no text is needed (mock data)
step_dp2() {
  [ -z "${DRY:-}" ] && step_install
  step_ADP2
  touch "$RES/DONE"
  log "session done"
}

copy_tree() {  # the jobs run from a copy: each device call lays the uploaded tree anew under them
  [ -d "$W/src" ] && return 0
  mkdir -p "$W/src" && tar --exclude=./.gpu-stage --exclude=./.gpu-data -cf - . | tar -xf - -C "$W/src"
}

step_stage() {  # what this call carried (parts of .gpu-stage, .gpu-data) to where the steps look for it
  mkdir -p /tmp/gpu-stage "$GD"
  [ -d .gpu-stage ] && cp -r .gpu-stage/. /tmp/gpu-stage/
  [ -d .gpu-data ] && cp -r .gpu-data/. "$GD"/
  ls /tmp/gpu-stage "$GD"
}

step_prepbg() {  # prep in the background (the staging calls go on meanwhile)
  copy_tree
  (cd "$W/src" && setsid nohup bash benchmarks/scripts/session.sh prep >"$RES/console/prep-session.txt" 2>&1 &)
  log "prep started in $W/src"
}

step_start() {
  copy_tree
  (cd "$W/src" && setsid nohup bash benchmarks/scripts/session.sh "${PLAN:-run}" >"$RES/console/session.txt" 2>&1 &)
  log "started in $W/src"
}

step_poll() {  # SECONDS: wait for DONE (at most that long), then pack what there is into $OUT
  if [ ! -f "$RES/steps.txt" ] || [ ! -d "$W/src" ]; then  # don't wait on a machine that runs nothing
    echo "no session on this machine: a fresh one (the last was given back after its idle time; results lost)"
    return 1
  fi
  local until=$(( $(date +%s) + ${1:-0} ))
  while [ ! -f "$RES/DONE" ] && [ "$(date +%s)" -lt "$until" ]; do sleep 5; done
  tail -n 40 "$RES/steps.txt"
  df -h "$W" | tail -n 1
  [ -n "${OUT:-}" ] || return 0
  (cd "$W" && tar czf "$OUT/res.tgz" --exclude='*.pt' res \
     $(ls -d exp/*/bench.json exp/*/table.md exp/*/*.png exp/*/*/bench-console.log exp/*/recipe.yaml \
        exp/*/eval exp/*/logs exp/*/tensorboard 2>/dev/null))
  ls -la "$OUT"
}

while [ $# -gt 0 ]; do
  case $1 in
    poll) step_poll "${2:-0}" || exit 1; shift $(( $# > 1 ? 2 : 1 )) ;;
    *) "step_$1"; shift ;;
  esac
done
