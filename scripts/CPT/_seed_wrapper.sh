# Shared by the four seed-compatible scripts in this folder; sourced, not run.
#
# The seed scripts (InfiXAI/InfiR2 scripts/CPT/*.sh) took `--nnodes N` and `--rdzv_endpoint HOST:PORT` and
# passed every other argument to Megatron, last. These wrappers keep those command lines working on top of
# `infir2`:
#   --nnodes N, --rdzv_endpoint HOST:PORT (also --nproc_per_node, --rdzv_id, and the dashed and NAME=VALUE
#   spellings), --exp NAME, --set KEY=VALUE, --dry-run   -> options of `infir2 train|decay`
#   --load X   decay scripts: the stable checkpoint (`infir2 decay --load X`: iter_0035000, a step number, or
#              a path to an iter_* folder such as exp/InfiR2_CPT_FP8_7B/checkpoints/iter_0035000)
#              full scripts: the base model to start from (checkpoint.pretrained; the run's own
#              checkpoints still win on a re-run, so the same command resumes)
#   anything else, and everything after `--`              -> Megatron, appended last (last one wins)
# Set INFIR2 to the infir2 executable to use; by default `infir2` on PATH, else `python3 -m infir2_cpt.cli`.

infir2_seed_usage() {
  local script=$1 mode=$2 recipe=$3
  cat <<USAGE
usage: bash $script [--nnodes N] [--rdzv_endpoint HOST:PORT] [--nproc_per_node N] [--exp NAME]
       [--set KEY=VALUE]... [--dry-run] $( [[ $mode == decay ]] && echo "--load iter_NNNNNNN|PATH" || echo "[--load BASE_CHECKPOINT]" ) [MEGATRON ARGS...]

Runs: infir2 $mode --recipe $recipe [options] [-- MEGATRON ARGS]
Run the same command on every node. See \`infir2 $mode --help\` and docs/recipes.md.
USAGE
}

infir2_seed_wrapper() {
  local script=$1 mode=$2 recipe=$3
  shift 3
  local -a opts=() megatron=()
  local load="" have_load=0
  while [[ $# -gt 0 ]]; do
    case $1 in
      --nnodes|--nproc_per_node|--nproc-per-node|--rdzv_endpoint|--rdzv-endpoint|--rdzv_id|--rdzv-id|--exp|--set|-s)
        if [[ $# -lt 2 ]]; then
          echo "$script: $1 needs a value" >&2
          return 2
        fi
        opts+=("$1" "$2")
        shift 2
        ;;
      --nnodes=*|--nproc_per_node=*|--nproc-per-node=*|--rdzv_endpoint=*|--rdzv-endpoint=*|--rdzv_id=*|--rdzv-id=*|--exp=*|--set=*)
        opts+=("$1")
        shift
        ;;
      --dry-run)
        opts+=("$1")
        shift
        ;;
      --load)
        if [[ $# -lt 2 ]]; then
          echo "$script: --load needs a value" >&2
          return 2
        fi
        load=$2 have_load=1
        shift 2
        ;;
      --load=*)
        load=${1#--load=} have_load=1
        shift
        ;;
      -h|--help)
        infir2_seed_usage "$script" "$mode" "$recipe"
        return 0
        ;;
      --)
        shift
        megatron+=("$@")
        break
        ;;
      *)
        megatron+=("$1")
        shift
        ;;
    esac
  done

  if [[ $mode == decay ]]; then
    if [[ $have_load == 0 ]]; then
      echo "$script: the decay needs the stable checkpoint to anneal from, e.g. --load iter_0035000" >&2
      infir2_seed_usage "$script" "$mode" "$recipe" >&2
      return 2
    fi
    opts+=(--load "$load")
  elif [[ $have_load == 1 ]]; then
    # The seed passed --load to Megatron, so every re-run restarted from the base model. infir2 starts from
    # it only while the run has no checkpoint of its own.
    echo "$script: --load $load -> --set checkpoint.pretrained (used until this run has its own checkpoints)" >&2
    opts+=(--set "checkpoint.pretrained='${load//\'/\'\'}'")
  fi

  local -a infir2
  if [[ -n ${INFIR2:-} ]]; then
    infir2=("$INFIR2")
  elif command -v infir2 >/dev/null 2>&1; then
    infir2=(infir2)
  else
    infir2=("${PYTHON:-python3}" -m infir2_cpt.cli)
  fi
  if [[ ${#megatron[@]} -gt 0 ]]; then
    exec "${infir2[@]}" "$mode" --recipe "$recipe" "${opts[@]}" -- "${megatron[@]}"
  fi
  exec "${infir2[@]}" "$mode" --recipe "$recipe" "${opts[@]}"
}
