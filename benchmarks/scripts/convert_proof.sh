#!/usr/bin/env bash
# GPU proof of the HF <-> Megatron conversion (benchmarks/2026-11-28-h200, part 2), on one H200 with TE 2.20.2 and
# megatron-core 0.19.2 installed and `pip install -e .` done. Nothing is downloaded: the HF models are random
# Qwen2 models made here with transformers, shaped like the `tiny` recipe (4 layers, hidden 1024, FFN 2816,
# 8 heads, 2 KV heads, RoPE 1e6) with a 32000-token vocabulary padded to 32768 rows.
#   bash benchmarks/scripts/convert_proof.sh            # all steps
#   bash benchmarks/scripts/convert_proof.sh models convert logits   # some of them
# Steps: models convert logits roundtrip cpt export final, and cptmain only when named (about 10 minutes in
# all; to stay under a 10-minute command limit run `models convert logits roundtrip`, then `cpt export final`
# on the same host). Work goes to $EV (default /tmp/cp); reports accumulate in $EV/reports across calls, and
# every call copies them, with a summary (convert_proof.json: each check's exit status, seconds and figures),
# to $OUT (default $EV/out). A check passed when its exit status is 0; logits checks pass under --max-rel
# (BF16 0.05, FP32 0.01; the trained checkpoint's BF16 comparison 0.08, see step_final).
set -uo pipefail
EV=${EV:-/tmp/cp}
OUT=${OUT:-$EV/out}
export INFIR2_EXP_ROOT=$EV/exp
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export PYTHONUNBUFFERED=1
export PATH="$HOME/.local/bin:$PATH"
R=$EV/reports
mkdir -p "$EV" "$OUT" "$R" "$INFIR2_EXP_ROOT"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$R/steps.txt"; }
# exit status and seconds of each check, for the summary
record() { echo "{\"step\": \"$1\", \"exit\": $2, \"seconds\": $3}" >>"$R/status.jsonl"; }
timed() { local name=$1; shift; local t0=$SECONDS; "$@"; local rc=$?; record "$name" "$rc" $((SECONDS - t0)); log "$name: exit $rc"; return $rc; }

# The recipe of every step: tiny, with the HF vocabulary and its padded size (all dims multiples of 128).
SETS=(--set model.vocab_size=32000 --set model.padded_vocab_size=32768)
TIED=(--set model.untie_embeddings=false)
CPT_EXP=convert-cpt
CPT_ITERS=30

step_models() {  # two random Qwen2 models (untied like 7B, tied like 1.5B), BF16 safetensors
  log "models"
  timed models python3 - "$EV" <<'EOF'
import json, sys, torch
from pathlib import Path
from transformers import Qwen2Config, Qwen2ForCausalLM
ev = Path(sys.argv[1])
for tied in (False, True):
    config = Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=1024, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
                         hidden_act="silu")
    torch.manual_seed(1234 + tied)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # norms and biases away from 1 and 0, so that a swapped tensor would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    out = ev / ("hf-tied" if tied else "hf-untied")
    model.to(torch.bfloat16).save_pretrained(str(out))
    print(out, sum(p.numel() for p in model.parameters()), "parameters")
EOF
}

step_convert() {  # hf-to-megatron for both; the entry verifies the written checkpoint bit for bit
  log "convert"
  rm -rf "$EV/meg-untied" "$EV/meg-tied"
  timed convert-untied infir2 convert hf-to-megatron --hf "$EV/hf-untied" --out "$EV/meg-untied" --recipe tiny \
    "${SETS[@]}" >"$R/convert-untied.log" 2>&1
  timed convert-tied infir2 convert hf-to-megatron --hf "$EV/hf-tied" --out "$EV/meg-tied" --recipe tiny \
    "${SETS[@]}" "${TIED[@]}" >"$R/convert-tied.log" 2>&1
  grep -h "infir2.convert" "$R"/convert-*.log | tee -a "$R/steps.txt"
  ls -la "$EV/meg-untied" "$EV/meg-untied/release" >>"$R/steps.txt" 2>&1
}

logits() {  # NAME HF CKPT DTYPE MAX_REL [recipe options...]
  local name=$1 hf=$2 ckpt=$3 dtype=$4 max_rel=$5; shift 5
  timed "logits-$name-$dtype" infir2 convert check-logits --hf "$hf" --ckpt "$ckpt" --dtype "$dtype" --batch 4 \
    --seq 512 --max-rel "$max_rel" --report "$R/logits-$name-$dtype.json" "$@" >"$R/logits-$name-$dtype.log" 2>&1
  [ -f "$R/logits-$name-$dtype.json" ] && tee -a "$R/steps.txt" <"$R/logits-$name-$dtype.json"
}

step_logits() {  # the converted checkpoints against transformers, BF16 (the proof) and FP32 (tighter)
  log "logits of the converted checkpoints"
  logits converted-untied "$EV/hf-untied" "$EV/meg-untied/release" bf16 0.05 --recipe tiny "${SETS[@]}"
  logits converted-tied "$EV/hf-tied" "$EV/meg-tied/release" bf16 0.05 --recipe tiny "${SETS[@]}" "${TIED[@]}"
  logits converted-untied "$EV/hf-untied" "$EV/meg-untied/release" fp32 0.01 --recipe tiny "${SETS[@]}"
}

step_roundtrip() {  # the GPU-written (TE) checkpoints straight back to HF: bit-exact with the source
  log "roundtrip without training"
  for v in untied tied; do
    local extra=(); [ "$v" = tied ] && extra=("${TIED[@]}")
    rm -rf "$EV/back-$v"
    timed "roundtrip-$v" infir2 convert megatron-to-hf --ckpt "$EV/meg-$v" --out "$EV/back-$v" --recipe tiny \
      "${SETS[@]}" "${extra[@]}" >"$R/roundtrip-$v.log" 2>&1
  done
  timed roundtrip-compare python3 - "$EV" "$R/roundtrip.json" <<'EOF'
import json, sys, torch
from pathlib import Path
from infir2_cpt.convert.mapping import read_hf_state
ev, report = Path(sys.argv[1]), Path(sys.argv[2])
result = {}
for v in ("untied", "tied"):
    src, back = read_hf_state(ev / f"hf-{v}"), read_hf_state(ev / f"back-{v}")
    same_keys = set(src) == set(back)
    differing = [k for k in src if k in back and not torch.equal(src[k], back[k])]
    src_cfg = json.loads((ev / f"hf-{v}" / "config.json").read_text())
    back_cfg = json.loads((ev / f"back-{v}" / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id")
    result[v] = {"tensors": len(src), "same_keys": same_keys, "differing_tensors": differing,
                 "bit_exact": same_keys and not differing,
                 "config_differences": {k: [src_cfg.get(k), back_cfg.get(k)] for k in keys
                                        if src_cfg.get(k) != back_cfg.get(k)}}
report.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
sys.exit(0 if all(r["bit_exact"] and not r["config_differences"] for r in result.values()) else 1)
EOF
}

step_cpt() {  # a few FP8 (blockwise, FP8 params) CPT steps of the tiny recipe from the converted checkpoint
  log "cpt from the converted checkpoint"
  rm -rf "${INFIR2_EXP_ROOT:?}/$CPT_EXP"
  # DRY=1: the launch validated and printed, not run (what the tests check; the converted folder need not exist)
  mkdir -p "$EV/meg-untied"
  timed cpt timeout 600 infir2 train --recipe tiny --exp "$CPT_EXP" --rdzv-endpoint localhost:29621 "${SETS[@]}" \
    --set "checkpoint.pretrained=$EV/meg-untied" --set schedule.train_iters=$CPT_ITERS \
    --set schedule.warmup_iters=3 --set schedule.decay_iters=10 --set checkpoint.save_interval=$CPT_ITERS \
    --set checkpoint.keep_every=$CPT_ITERS --set logging.eval_interval=$CPT_ITERS --set logging.eval_iters=1 \
    ${DRY:+--dry-run} >"$EV/cpt.out" 2>&1 || return
  [ -n "${DRY:-}" ] && return
  timed cpt-summary python3 - "$INFIR2_EXP_ROOT/$CPT_EXP" "$EV/meg-untied" "$R/cpt.json" <<'EOF'
import json, sys
from pathlib import Path
from infir2_cpt.reports.runlog import read_logs
exp, pretrained, report = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
log = read_logs(exp / "logs")
text = "\n".join(p.read_text(errors="replace") for p in sorted((exp / "logs").glob("*.log")))
losses = [(it.iteration, it.loss) for it in log.iterations if it.loss is not None]
result = {
    "loaded": log.loaded, "saved": log.saved,
    "loaded_release_of_converted": any(d.rstrip("/") == pretrained.rstrip("/") and i == 0 for d, i in log.loaded),
    "release_line": [l.strip() for l in text.splitlines() if "loading release" in l][:2],
    "finetune_line": [l.strip() for l in text.splitlines() if "attempting to finetune" in l][:1],
    "losses": losses, "first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None,
    "fp8": [l.strip() for l in text.splitlines() if "fp8_recipe" in l or "fp8_param" in l][:4],
}
report.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=2))
ok = result["loaded_release_of_converted"] and len(losses) >= 20 and result["last_loss"] < result["first_loss"]
sys.exit(0 if ok else 1)
EOF
  ls "$INFIR2_EXP_ROOT/$CPT_EXP/checkpoints" | tee -a "$R/steps.txt"
}

step_cptmain() {  # optional: the same start with FP32 master weights taken from the BF16 checkpoint, not from
  # the dequantized FP8 parameters (Megatron accepts --load-main-params-from-ckpt only with --no-load-optim)
  log "cpt from the converted checkpoint, master weights from the checkpoint"
  rm -rf "${INFIR2_EXP_ROOT:?}/$CPT_EXP-main"
  timed cptmain timeout 600 infir2 train --recipe tiny --exp "$CPT_EXP-main" --rdzv-endpoint localhost:29622 \
    "${SETS[@]}" --set "checkpoint.pretrained=$EV/meg-untied" --set schedule.train_iters=10 \
    --set schedule.warmup_iters=3 --set schedule.decay_iters=3 --set checkpoint.save_interval=10 --set checkpoint.keep_every=10 \
    --set logging.eval_interval=10 --set logging.eval_iters=1 -- --no-load-optim --load-main-params-from-ckpt \
    >"$EV/cptmain.out" 2>&1
  python3 - "$INFIR2_EXP_ROOT/$CPT_EXP-main" "$R/cptmain.json" <<'EOF'
import json, sys
from pathlib import Path
from infir2_cpt.reports.runlog import read_logs
exp, report = Path(sys.argv[1]), Path(sys.argv[2])
log = read_logs(exp / "logs")
result = {"loaded": log.loaded, "saved": log.saved,
          "losses": [(it.iteration, it.loss) for it in log.iterations if it.loss is not None]}
report.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
EOF
}

step_export() {  # the trained checkpoint to HF; recipe and source config found through exp/<name>/recipe.yaml
  log "export the CPT checkpoint"
  local iter; iter=$(printf 'iter_%07d' "$CPT_ITERS")
  rm -rf "$EV/hf-cpt"
  timed export infir2 convert megatron-to-hf --ckpt "$INFIR2_EXP_ROOT/$CPT_EXP/checkpoints/$iter" \
    --out "$EV/hf-cpt" --tokenizer "$EV/hf-untied" >"$R/export.log" 2>&1
  grep -h "^#\|infir2.convert" "$R/export.log" | tee -a "$R/steps.txt"
}

step_final() {  # transformers loads the export; its logits match Megatron's; it has learnt what the CPT run learnt
  log "final: exported model vs the trained checkpoint"
  local iter; iter=$(printf 'iter_%07d' "$CPT_ITERS")
  local ckpt="$INFIR2_EXP_ROOT/$CPT_EXP/checkpoints/$iter"
  # FP32 is the exactness check. In BF16 two libraries' kernels round differently through every layer of weights that
  # training has moved: 4.98 % and 5.07 % of the largest logit (about 7 BF16 steps at its size) were measured, with
  # 98 % top-1 agreement, on two runs whose FP32 comparisons were within 0.07 %
  logits cpt "$EV/hf-cpt" "$ckpt" bf16 0.08
  logits cpt "$EV/hf-cpt" "$ckpt" fp32 0.01
  timed final-load python3 - "$EV" "$R/final.json" "$R/cpt.json" <<'EOF'
import json, sys, torch
from pathlib import Path
from transformers import Qwen2ForCausalLM
from infir2_cpt.convert.mapping import read_hf_state
ev, report, cpt = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

def load(name):
    return Qwen2ForCausalLM.from_pretrained(str(ev / name), dtype=torch.bfloat16).to("cuda", torch.bfloat16).eval()

def mock_loss(model):
    """Loss on the mock data's pattern: Megatron's MockGPTLowLevelDataset documents are the runs 1, 2, ..,
    L-1 (L < 4096) followed by EOD. The trained export must have learnt it; the source model has not."""
    starts = torch.tensor([1, 300, 1500, 3000])
    tokens = (starts[:, None] + torch.arange(512)[None]).cuda()
    with torch.no_grad():
        return float(model(input_ids=tokens, labels=tokens).loss)

after = load("hf-cpt")
tokens = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
with torch.no_grad():
    generated = after.generate(tokens, max_new_tokens=8, min_new_tokens=8, do_sample=False)
loss_after = mock_loss(after)
del after
loss_before = mock_loss(load("hf-untied"))
megatron_last = json.loads(cpt.read_text())["last_loss"] if cpt.exists() else None
state_before, state_after = read_hf_state(ev / "hf-untied"), read_hf_state(ev / "hf-cpt")
changed = {k: float((state_after[k].float() - state_before[k].float()).norm() / state_before[k].float().norm())
           for k in state_before}
result = {"generated_tokens": generated.shape[1] - tokens.shape[1],
          "files": sorted(p.name for p in (ev / "hf-cpt").iterdir()),
          "dtypes": sorted({str(t.dtype) for t in state_after.values()}),
          "same_tensor_names": set(state_after) == set(state_before),
          "mock_loss_source_model": loss_before, "mock_loss_exported_model": loss_after,
          "megatron_last_training_loss": megatron_last,
          "relative_weight_change_median": sorted(changed.values())[len(changed) // 2],
          "relative_weight_change_max": max(changed.values()),
          "config": json.loads((ev / "hf-cpt" / "config.json").read_text())}
report.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
ok = (result["generated_tokens"] == 8 and result["dtypes"] == ["torch.bfloat16"] and result["same_tensor_names"]
      and megatron_last is not None and loss_after < (loss_before + megatron_last) / 2)
sys.exit(0 if ok else 1)
EOF
}

summary() {  # every report so far (this call's and earlier calls') and the summary into $OUT
  python3 - "$R" <<'EOF'
import json, sys
from pathlib import Path
reports_dir = Path(sys.argv[1])
status_file = reports_dir / "status.jsonl"
status = [json.loads(l) for l in status_file.read_text().splitlines()] if status_file.exists() else []
reports = {p.stem: json.loads(p.read_text()) for p in sorted(reports_dir.glob("*.json")) if p.name != "convert_proof.json"}
latest = {s["step"]: s for s in status}  # a check run again counts with its last result
summary = {"steps": status, "all_passed": bool(latest) and all(s["exit"] == 0 for s in latest.values()),
           "reports": reports}
(reports_dir / "convert_proof.json").write_text(json.dumps(summary, indent=2) + "\n")
for s in status:
    print(f"{s['step']:<28} exit {s['exit']}  {s['seconds']} s")
for name, r in reports.items():
    if name.startswith("logits-"):
        print(f"{name:<28} max_abs {r['max_abs']:.3g}  max_rel {r['max_rel']:.3g}  top1 {r['top1_agreement']:.4f}")
EOF
  cp -r "$R"/. "$OUT"/
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(models convert logits roundtrip cpt export final)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$R/steps.txt"
python3 -c "import torch, transformer_engine as te, megatron.core as mc, transformers as t; print('torch', torch.__version__, 'TE', te.__version__, 'mcore', mc.__version__, 'transformers', t.__version__)" 2>&1 | tee -a "$R/steps.txt"
for step in "${steps[@]}"; do "step_$step"; done
summary | tee -a "$R/steps.txt"
log "done"
# the exit status says whether every check of this call and the earlier ones passed
python3 -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['all_passed'] else 1)" "$R/convert_proof.json"
