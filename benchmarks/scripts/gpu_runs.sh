#!/usr/bin/env bash
# The training runs of benchmarks/2026-11-28-h200 (part 1), on a host with 1-2 H200s, TE and megatron-core installed
# (see ../shared/gpu/install.sh). Each step is a function; run several:
#   bash benchmarks/scripts/gpu_runs.sh setup tiny tp2 resume decay sigterm gputests
# Experiments go to $EV/exp (default /tmp/ev/exp); a summary and the logs land in $OUT (default $EV/out).
set -uo pipefail
EV=${EV:-/tmp/ev}
OUT=${OUT:-$EV/out}
export INFIR2_EXP_ROOT=$EV/exp
mkdir -p "$EV" "$OUT" "$INFIR2_EXP_ROOT"
export PYTHONUNBUFFERED=1
export PATH="$HOME/.local/bin:$PATH"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/steps.txt"; }

# Runs `infir2 ...` in its own process group in the background; prints its PID.
start_bg() { local out=$1; shift; setsid "$@" >"$out" 2>&1 & echo $!; }
# Waits until an experiment's console log shows iteration >= $2 (or the process ends); 300 s at most.
wait_iter() {
  local exp=$1 target=$2 pid=$3
  for _ in $(seq 1 600); do
    local last
    last=$(cat "$INFIR2_EXP_ROOT/$exp"/logs/*.log 2>/dev/null | grep -oE 'iteration +[0-9]+/' | tail -n1 | grep -oE '[0-9]+')
    [ -n "$last" ] && [ "$last" -ge "$target" ] && { echo "$last"; return 0; }
    kill -0 "$pid" 2>/dev/null || { echo "ended"; return 1; }
    sleep 0.5
  done
  echo "timeout"; return 1
}

step_setup() {
  log "setup"
  bash /tmp/gpu-stage/w/install.sh 2>&1 | tail -n 3
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/steps.txt"
  python3 -c "import torch, transformer_engine as te, megatron.core as mc; print('torch', torch.__version__, 'TE', te.__version__, 'mcore', mc.__version__, 'gpus', torch.cuda.device_count())" | tee -a "$OUT/steps.txt"
}

step_tiny() {  # tiny recipe, FP8 blockwise (GPU 0) and BF16 (GPU 1) side by side
  log "tiny fp8 + bf16"
  CUDA_VISIBLE_DEVICES=0 timeout 400 infir2 train --recipe tiny --exp tiny-fp8 --rdzv-endpoint localhost:29501 >"$EV/tiny-fp8.out" 2>&1 &
  local a=$!
  CUDA_VISIBLE_DEVICES=1 timeout 400 infir2 train --recipe tiny --exp tiny-bf16 --set precision.fp8=null --rdzv-endpoint localhost:29502 >"$EV/tiny-bf16.out" 2>&1 &
  local b=$!
  wait $a; log "tiny-fp8 exit $?"
  wait $b; log "tiny-bf16 exit $?"
}

step_tp2() {  # 1.5B shape, 4 layers, TP=2 with the seed's flags, on 2 GPUs
  log "tp2 1.5b"
  timeout 400 infir2 train --recipe 1.5b --exp tp2-1.5b --nproc-per-node 2 --rdzv-endpoint localhost:29503 \
    --set model.num_layers=4 --set model.seq_length=4096 --set model.max_position_embeddings=4096 \
    --set data.mock=true --set 'data.blend=[]' --set tokenizer.type=NullTokenizer --set tokenizer.model=null \
    --set model.vocab_size=151935 --set parallel.global_batch_size=16 --set schedule.train_iters=60 \
    --set schedule.warmup_iters=5 --set schedule.decay_iters=10 --set checkpoint.save_interval=30 \
    --set logging.eval_interval=30 --set logging.eval_iters=1 --set logging.wandb_project=null \
    --set data.num_workers=2 >"$EV/tp2.out" 2>&1
  log "tp2 exit $?"
}

step_resume() {  # SIGKILL the whole process group past two saves, re-run the same command
  log "resume: first run"
  local cmd=(infir2 train --recipe tiny --exp tiny-resume --rdzv-endpoint localhost:29504)
  local pid; pid=$(CUDA_VISIBLE_DEVICES=0 start_bg "$EV/resume-1.out" "${cmd[@]}")
  local at; at=$(wait_iter tiny-resume 215 "$pid"); log "resume: at iteration $at, SIGKILL to process group $pid"
  kill -KILL -- "-$pid"; sleep 10  # DataLoader workers notice their parent died within ~5 s
  log "workers still alive after the kill: $(pgrep -fc 'infir2_cpt.runtime.entry' || true)"
  ls "$INFIR2_EXP_ROOT/tiny-resume/checkpoints" | tee -a "$OUT/steps.txt"
  log "resume: same command again"
  CUDA_VISIBLE_DEVICES=0 timeout 400 "${cmd[@]}" >"$EV/resume-2.out" 2>&1; log "resume: second run exit $?"
}

step_decay() {  # decay from a stable checkpoint, killed and re-run
  log "decay: first run from iter_0000200"
  local cmd=(infir2 decay --recipe tiny --load iter_0000200 --exp tiny-resume_decay --set checkpoint.save_interval=20 --rdzv-endpoint localhost:29505)
  [ -d "$INFIR2_EXP_ROOT/tiny-resume/checkpoints/iter_0000200" ] || { log "decay: no stable checkpoint"; return; }
  # the decay recipe is derived from tiny; its stable experiment is 'tiny', ours is 'tiny-resume'
  cmd+=(--set stable_name=tiny-resume)
  local pid; pid=$(CUDA_VISIBLE_DEVICES=0 start_bg "$EV/decay-1.out" "${cmd[@]}")
  local at; at=$(wait_iter tiny-resume_decay 245 "$pid"); log "decay: at iteration $at, SIGKILL to process group $pid"
  kill -KILL -- "-$pid"; sleep 10  # DataLoader workers notice their parent died within ~5 s
  log "workers still alive after the kill: $(pgrep -fc 'infir2_cpt.runtime.entry' || true)"
  ls "$INFIR2_EXP_ROOT/tiny-resume_decay/checkpoints" | tee -a "$OUT/steps.txt"
  log "decay: same command again"
  CUDA_VISIBLE_DEVICES=0 timeout 400 "${cmd[@]}" >"$EV/decay-2.out" 2>&1; log "decay: second run exit $?"
}

step_sigterm() {  # SIGTERM to `infir2 train` mid-run: checkpoint at that iteration, exit 0, resume
  log "sigterm: first run"
  local cmd=(infir2 train --recipe tiny --exp tiny-term --rdzv-endpoint localhost:29506)
  CUDA_VISIBLE_DEVICES=1 "${cmd[@]}" >"$EV/term-1.out" 2>&1 &
  local pid=$!
  local at; at=$(wait_iter tiny-term 57 "$pid"); log "sigterm: at iteration $at, SIGTERM to launcher pid $pid"
  kill -TERM "$pid"; wait "$pid"; log "sigterm: launcher exit code $?"
  ls "$INFIR2_EXP_ROOT/tiny-term/checkpoints" | tee -a "$OUT/steps.txt"
  cat "$INFIR2_EXP_ROOT/tiny-term/checkpoints/latest_checkpointed_iteration.txt" | tee -a "$OUT/steps.txt"
  log "sigterm: same command again"
  CUDA_VISIBLE_DEVICES=1 timeout 400 "${cmd[@]}" >"$EV/term-2.out" 2>&1; log "sigterm: second run exit $?"
}

step_data() {  # the tiny recipe on a dataset made by `infir2 prepare-data` (toy corpus + toy tokenizer)
  log "data: corpus, tokenizer, prepare-data"
  local d=$EV/data
  mkdir -p "$d"
  python3 scripts/make_toy_corpus.py --output "$d/toy.jsonl" --size-mb 40 --tokenizer-dir "$d/toy-tokenizer" \
    --vocab-size 32000 --tokenizer-sample-mb 10 2>&1 | tail -n 3 | tee -a "$OUT/steps.txt"
  infir2 prepare-data --input "$d/toy.jsonl" --tokenizer "$d/toy-tokenizer" --output-prefix "$d/toy" --workers 8 --force \
    2>&1 | tail -n 4 | tee -a "$OUT/steps.txt"
  infir2 inspect-data "$d/toy_text_document" --tokenizer "$d/toy-tokenizer" --n 1 2>&1 | head -n 12 | tee -a "$OUT/steps.txt"
  log "data: tiny on the prepared data"
  CUDA_VISIBLE_DEVICES=${DATA_GPU:-1} timeout 400 infir2 train --recipe tiny --exp tiny-data --rdzv-endpoint localhost:29507 \
    --set data.mock=false --set "data.blend=[{path: $d/toy_text_document, weight: 1.0}]" --set data.split=98,2,0 \
    --set tokenizer.type=HuggingFaceTokenizer --set "tokenizer.model=$d/toy-tokenizer" >"$EV/data.out" 2>&1
  log "data: exit $?"
}

step_gputests() {
  log "pytest tests/gpu"
  timeout 500 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tail -n 15 | tee -a "$OUT/steps.txt"
}

collect() {
  local dirs=()
  for d in "$INFIR2_EXP_ROOT"/*/; do [ -f "$d/recipe.yaml" ] && dirs+=("$d"); done
  [ ${#dirs[@]} -gt 0 ] || return 0
  python3 benchmarks/scripts/run_summary.py "${dirs[@]}" >"$OUT/runs.json" 2>"$OUT/summary-errors.txt"
  python3 benchmarks/scripts/tb_summary.py "${dirs[@]}" >"$OUT/tensorboard.json" 2>>"$OUT/summary-errors.txt"
  (cd "$EV" && tar czf "$OUT/logs.tgz" --exclude='*.distcp' --exclude='data_cache' exp/*/logs exp/*/launch.sh \
     exp/*/schedule.json $(ls exp/*/decay_source.json 2>/dev/null) *.out 2>/dev/null)
  find "$INFIR2_EXP_ROOT" -maxdepth 3 -name 'iter_*' -o -maxdepth 3 -name latest_checkpointed_iteration.txt \
    | sort >"$OUT/checkpoints.txt"
}

for step in "$@"; do
  case $step in
    *+*) for s in ${step//+/ }; do "step_$s" & done; wait ;;  # a+b: run side by side (different GPUs)
    *) "step_$step" ;;
  esac
done
collect
log "done"
