#!/usr/bin/env bash
# Qwen2.5-7B FP8-blockwise continual pre-training: warmup -> stable -> decay, 40k steps.
# The seed's InfiR2_CPT_FP8_7B.sh, now a thin wrapper over infir2 (recipe: src/infir2_cpt/recipe/recipes/7b.yaml;
# differences from the seed: docs/recipes.md). Same command lines as the seed, e.g.
#   bash scripts/CPT/InfiR2_CPT_FP8_7B.sh --nnodes 4 --rdzv_endpoint master_ip:29400
# which runs: infir2 train --recipe 7b [options] [-- Megatron args]. Add --dry-run to print the command only.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_seed_wrapper.sh"
infir2_seed_wrapper "$(basename "$0")" train 7b "$@"
