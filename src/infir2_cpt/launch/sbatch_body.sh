# The body of the batch script `infir2 sbatch` prints, after its #SBATCH lines (launch/slurm.py fills in the
# @NAME@ values). Every step and every signal path is tested with stand-ins for Slurm (tests/process/test_slurm.py).

set -uo pipefail

# ---- fixed when the script was generated
EXP_ROOT=@EXP_ROOT@
EXP_DIR=@EXP_DIR@
LOGS=@LOGS@
TRACKER=@TRACKER@
STOP_REQUEST=@STOP_REQUEST@
TRAIN_ITERS=@TRAIN_ITERS@
PORT=@PORT@
INFIR2=${INFIR2_BIN:-@INFIR2@}
export INFIR2_EXP_ROOT="$EXP_ROOT"

log() { echo "infir2-sbatch [$(date '+%F %T')]: $*" >&2; }

if [ -z "${SLURM_JOB_ID:-}" ] || [ -z "${SLURM_JOB_NODELIST:-}" ]; then
    log "not inside a Slurm job: submit this script with sbatch"
    exit 2
fi
mkdir -p "$LOGS"

# ---- the rendezvous: the first node of the allocation hosts it
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
if [ -z "$HEAD" ]; then
    log "cannot read the first node of SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' (scontrol show hostnames)"
    exit 1
fi
RDZV_ID="infir2-$SLURM_JOB_ID"

latest_iteration() {  # the iteration of the tracker (0 when there is none or it is not a number)
    local it=""
    [ -r "$TRACKER" ] && it=$(tr -dc '0-9' < "$TRACKER")
    echo $((10#${it:-0}))
}

START_ITER=$(latest_iteration)
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES node(s) $SLURM_JOB_NODELIST;" \
    "rendezvous $HEAD:$PORT id $RDZV_ID; checkpoint iteration $START_ITER of $TRAIN_ITERS"

# ---- stopping: SIGUSR1 (time-limit warning, or by hand) -> a stop request -> save, exit, requeue
# Not a signal through srun: Slurm would deliver it to every process of the step, the workers' checkpoint
# writers included, and the save it asks for would fail. Every node's launcher watches the request file
# and sends SIGTERM to its workers alone.
STOP=""
INTERRUPTED=0
SRUN_PID=""
forward_stop() {
    log "asking every node's launcher to save a checkpoint and stop (infir2 stop $EXP_DIR)"
    "$INFIR2" stop "$EXP_DIR" || log "infir2 stop failed: the step runs on until the time limit"
}
on_usr1() {
    INTERRUPTED=1
    if [ "$STOP" = USR1 ]; then
        log "SIGUSR1 again: the stop is already under way"
        return
    fi
    STOP=USR1
    log "SIGUSR1: time limit near (or a stop was asked for): stopping cleanly, then requeueing"
    forward_stop
}
on_term() {
    INTERRUPTED=1
    [ -n "$STOP" ] || STOP=TERM
    log "SIGTERM: the job is ending (scancel, preemption or time limit); Slurm signals the training step" \
        "itself, waiting for it to save and exit"
}
trap on_usr1 USR1
trap on_term TERM

# ---- the training step: one infir2 launcher per node
rm -f "$STOP_REQUEST"  # a request left over from an earlier attempt must not stop this one
srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --cpu-bind=none \
    --output="$LOGS/slurm-%j-%N.log" --open-mode=append \
    "$INFIR2" @TRAIN_ARGS@ &
SRUN_PID=$!
[ "$STOP" = USR1 ] && forward_stop  # the signal came before srun had started

RC=0
while :; do
    INTERRUPTED=0
    wait "$SRUN_PID"
    RC=$?
    # a trapped signal interrupts `wait` (status > 128) while srun runs on: wait again
    if [ "$INTERRUPTED" = 1 ] && [ "$RC" -gt 128 ]; then
        continue
    fi
    break
done

END_ITER=$(latest_iteration)
log "training step exited with status $RC; checkpoint iteration $END_ITER of $TRAIN_ITERS"

requeue() {
    log "requeueing job $SLURM_JOB_ID ($1): the same script resumes from the last complete checkpoint"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    log "scontrol requeue failed: submit this script again to resume"
    exit 1
}

if [ "$END_ITER" -ge "$TRAIN_ITERS" ]; then
    log "the run is complete"
    exit "$RC"
fi
if [ "$STOP" = USR1 ]; then
    requeue "stopped on SIGUSR1 at iteration $END_ITER"
fi
if [ -z "$STOP" ] && [ "$RC" -eq 0 ] && [ "$END_ITER" -gt "$START_ITER" ]; then
    requeue "the step stopped cleanly at iteration $END_ITER, before train_iters (launch.exit_duration_minutes)"
fi
exit "$RC"
