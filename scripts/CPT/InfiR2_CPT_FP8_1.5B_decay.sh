#!/usr/bin/env bash
# Qwen2.5-1.5B decay only: anneal from a stable-phase checkpoint into exp/InfiR2_CPT_FP8_1.5B_decay.
# The seed's InfiR2_CPT_FP8_1.5B_decay.sh, now a thin wrapper over infir2 (recipe: src/infir2_cpt/recipe/recipes/1.5b.yaml;
# differences from the seed: docs/recipes.md). Same command lines as the seed, e.g.
#   bash scripts/CPT/InfiR2_CPT_FP8_1.5B_decay.sh --load exp/InfiR2_CPT_FP8_1.5B/checkpoints/iter_0035000
# which runs: infir2 decay --recipe 1.5b [options] [-- Megatron args]. Add --dry-run to print the command only.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_seed_wrapper.sh"
infir2_seed_wrapper "$(basename "$0")" decay 1.5b "$@"
