#!/usr/bin/env bash
# The second machine of 2026-11-30 (second session), run from the repository root after the staging of
# ../shared/gpu/fetch-wheels.sh: install; then GPU 0: transposes on demand at the 7B shape, GPU 1: the text, then
# the fidelity of fp8-lean.
set -u
W=/tmp/w; R=$W/res; mkdir -p $R/console $W/data
export INFIR2_EXP_ROOT=$W/exp PYTHONUNBUFFERED=1 PATH="$HOME/.local/bin:$PATH"
bash /tmp/gpu-stage/w/install.sh > $R/console/install.txt 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >> $R/console/install.txt 2>&1
echo "[$(date +%T)] installed" >> $R/steps.txt
( python3 benchmarks/scripts/gather_text.py --out $W/data --train-mb 200 --heldout-percent 2 /opt/torch/.venv/lib/python3.12/site-packages /usr/lib/python3* > $R/console/gather.txt 2>&1
  infir2 prepare-data --input $W/data/train.jsonl --tokenizer .gpu-data/qwen-tokenizer --output-prefix $W/data/train --workers 24 --force > $R/console/prep.txt 2>&1
  echo "[$(date +%T)] data $?" >> $R/steps.txt
  CUDA_VISIBLE_DEVICES=1 infir2 bench --exp fid-lean --fidelity --recipe tiny --data $W/data/train_text_document --tokenizer .gpu-data/qwen-tokenizer --steps 500 --set launch.rdzv_endpoint=localhost:29561 --variants-file benchmarks/bench_candidates.yaml --variants fp8-lean --baseline fp8-lean --timeout-minutes 5 > $R/console/fid-lean.txt 2>&1
  echo "[$(date +%T)] fid-lean exit $?" >> $R/steps.txt ) &
CUDA_VISIBLE_DEVICES=0 infir2 bench --exp b7-tod --recipe 7b --layers 8 --seq 8192 --steps 6 --warmup-steps 3 --variants-file benchmarks/bench_candidates.yaml --set launch.rdzv_endpoint=localhost:29404 --variants fp8-tod,fp8-lean --baseline fp8-tod --timeout-minutes 4 > $R/console/b7-tod.txt 2>&1
echo "[$(date +%T)] b7-tod exit $?" >> $R/steps.txt
wait
cat $R/steps.txt; tail -8 $R/console/b7-tod.txt; tail -5 $R/console/fid-lean.txt
cd $W && tar czf $OUT/res.tgz res $(ls -d exp/*/bench.json exp/*/table.md exp/*/*.png exp/*/*/bench-console.log 2>/dev/null)
