#!/usr/bin/env bash
# Qwen2.5-7B decay only: anneal from a stable-phase checkpoint into exp/InfiR2_CPT_FP8_7B_decay.
# The seed's InfiR2_CPT_FP8_7B_decay.sh, now a thin wrapper over infir2 (recipe: src/infir2_cpt/recipe/recipes/7b.yaml;
# differences from the seed: docs/recipes.md). Same command lines as the seed, e.g.
#   bash scripts/CPT/InfiR2_CPT_FP8_7B_decay.sh --load exp/InfiR2_CPT_FP8_7B/checkpoints/iter_0035000
# which runs: infir2 decay --recipe 7b [options] [-- Megatron args]. Add --dry-run to print the command only.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_seed_wrapper.sh"
infir2_seed_wrapper "$(basename "$0")" decay 7b "$@"
