"""GPU check of precision.fp8_bf16_param_remainders on the tiny recipe (one GPU, ~5 short runs, a few minutes).

    python3 benchmarks/scripts/remainders_check.py --out $OUT [--steps 20] [--dry-run] [--selftest]

Runs (same seed, mock data, `infir2 train --recipe tiny`), each dumping the FP32 masters of the BF16 params (the
option's own diagnostic, INFIR2_BF16_MASTERS_DUMP) after chosen optimizer steps:
  off      FP8 as shipped (Megatron FP32 masters for every param)         dumps after steps 1, S/2, S
  off2     the same command again: the run-to-run noise floor            dumps after steps 1, S
  on       with the option                                                dumps after steps 1, S/2, S
  on-stop  with the option, Megatron's --exit-interval S/2 (dumps after step S/2, saves, exits), then the same
           command again (resumes): dumps right after the load
What must hold (each line of the report says pass/FAIL and the numbers):
  (a) loss of iteration 1 identical on/off; later iterations: |on - off| within the off/off2 spread, or within
      1e-3 relative when off/off2 are bitwise identical (TE rounds the BF16 param half away from zero on exact
      ties, Megatron's FP32->BF16 copy to nearest even: ~2^-17 of the BF16 elements differ by one ulp per step,
      so bitwise equality after step 1 is not expected);
  (b) after step 1: FP32 masters of every BF16 param bitwise equal on/off (when off/off2 are); the BF16 params
      equal TE's rounding of those masters (on) and round-to-nearest-even (off): the remainder holds the master;
  (c) Megatron's max allocated lower by 2 bytes per BF16 param (1 GPU) within 10 % + 16 MiB;
  (d) the second on-stop launch loaded iteration S/2, and its masters and BF16 params right after the load equal
      (bitwise) those its first launch had after step S/2 (the checkpoint holds BF16 + remainder exactly); its
      losses after the resume stay within the (a) tolerance of on's.
--dry-run plans every launch with `infir2 train --dry-run` (CPU); --selftest checks the comparisons on synthetic
dumps (CPU). Writes remainders_check.json and each run's console into --out; exit status 0 iff all pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

OPTION = "precision.fp8_bf16_param_remainders=true"


def train_command(exp: str, steps: int, port: int, option: bool, extra: list[str], dry: bool) -> list[str]:
    cmd = ["infir2", "train", "--recipe", "tiny", "--exp", exp, "--rdzv-endpoint", f"localhost:{port}",
           "--set", f"schedule.train_iters={steps}", "--set", "schedule.warmup_iters=2",
           "--set", "schedule.decay_iters=2", "--set", f"checkpoint.save_interval={steps // 2}",
           "--set", "logging.log_interval=1", "--set", "logging.eval_interval=1000"]
    cmd += ["--set", OPTION] if option else []
    cmd += ["--dry-run"] if dry else []
    return cmd + (["--", *extra] if extra else [])


def run(cmd: list[str], console: Path, env: dict[str, str]) -> int:
    with console.open("a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}).returncode


# --------------------------------------------------------------------------- comparisons (CPU, pure)


def bits_differ(a: Any, b: Any) -> int:
    import torch

    view = torch.int32 if a.dtype == torch.float32 else torch.int16
    return int((a.contiguous().view(view) != b.contiguous().view(view)).sum())


def compare_dumps(a: dict, b: dict, key: str) -> dict[str, Any]:
    """Elements whose bits differ, and the largest |difference|, over every param of two dumps."""
    if set(a) != set(b):
        return {"error": f"different params: {sorted(set(a) ^ set(b))[:5]}"}
    differ = sum(bits_differ(a[n][key], b[n][key]) for n in a)
    worst = max(float((a[n][key].float() - b[n][key].float()).abs().max()) for n in a)
    return {"elements": sum(a[n][key].numel() for n in a), "bits_differ": differ, "max_abs": worst}


def rounding_holds(dump: dict, te_rounding: bool) -> int:
    """Elements whose BF16 param is not the expected rounding of its FP32 master (TE's or torch's)."""
    from infir2_cpt.runtime.optimizer_remainders import split_fp32

    bad = 0
    for row in dump.values():
        expected = split_fp32(row["master"])[0] if te_rounding else row["master"].to(row["param"].dtype)
        bad += bits_differ(row["param"].reshape(-1), expected.reshape(-1))
    return bad


def check(results: dict[str, Any], name: str, ok: bool, detail: Any) -> None:
    results.setdefault("checks", []).append({"check": name, "pass": bool(ok), "detail": detail})
    print(f"{'pass' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def evaluate(dumps: dict[str, Any], losses: dict[str, dict[int, float]], max_alloc_mb: dict[str, float | None],
             loaded: list[int], steps: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    half = steps // 2
    # (b) masters after step 1
    noise = compare_dumps(dumps["off@1"], dumps["off2@1"], "master")
    on_off = compare_dumps(dumps["on@1"], dumps["off@1"], "master")
    res["info: masters after step 1, off vs off2 (the noise floor)"] = noise
    check(res, "(b) masters after step 1, on vs off bitwise", on_off.get("bits_differ") == 0
          or noise.get("bits_differ", 0) > 0, on_off)
    check(res, "(b) on: BF16 params are TE's rounding of the masters", rounding_holds(dumps["on@1"], True) == 0,
          rounding_holds(dumps["on@1"], True))
    check(res, "(b) off: BF16 params are round-to-nearest-even of the masters",
          rounding_holds(dumps["off@1"], False) == 0, rounding_holds(dumps["off@1"], False))
    res[f"info: masters after step {steps}"] = {
        "on_off": compare_dumps(dumps[f"on@{steps}"], dumps[f"off@{steps}"], "master"),
        "off_off2": compare_dumps(dumps[f"off@{steps}"], dumps[f"off2@{steps}"], "master")}
    # (a) losses
    its = sorted(set(losses["on"]) & set(losses["off"]) & set(losses["off2"]))
    spread = max((abs(losses["off"][i] - losses["off2"][i]) for i in its), default=0.0)
    gap = max((abs(losses["on"][i] - losses["off"][i]) for i in its), default=None)
    first = its[0] if its else None
    check(res, "(a) loss of the first iteration identical", first is not None
          and losses["on"][first] == losses["off"][first], {i: (losses["on"][i], losses["off"][i]) for i in its[:1]})
    tol = spread if spread > 0 else 1e-3 * max(abs(losses["off"][i]) for i in its) if its else 0.0
    check(res, "(a) |loss on - off| within the off/off2 spread (or 1e-3 relative)", gap is not None and gap <= tol,
          {"max_gap": gap, "tolerance": tol, "off_off2_spread": spread, "iterations": len(its)})
    # (c) memory
    n_bf16 = sum(row["master"].numel() for row in dumps["on@1"].values())
    expected_mb = 2 * n_bf16 / 2**20
    on_mb, off_mb = max_alloc_mb.get("on"), max_alloc_mb.get("off")
    delta = None if on_mb is None or off_mb is None else off_mb - on_mb
    check(res, "(c) max allocated lower by 2 B per BF16 param", delta is not None
          and abs(delta - expected_mb) <= 0.1 * expected_mb + 16,
          {"bf16_params": n_bf16, "expected_MiB": round(expected_mb, 1), "off_MiB": off_mb, "on_MiB": on_mb,
           "delta_MiB": delta})
    # (d) save and resume
    check(res, f"(d) the resumed launch loaded iteration {half}", half in loaded, loaded)
    for key in ("master", "param"):
        cmp = compare_dumps(dumps["on-stop@resume0"], dumps[f"on-stop@{half}"], key)
        check(res, f"(d) {key}s right after the load equal the saving launch's after step {half}",
              cmp.get("bits_differ") == 0, cmp)
    after = [i for i in sorted(losses["on-stop"]) if i > half and i in losses["on"]]
    worst = max((abs(losses["on-stop"][i] - losses["on"][i]) for i in after), default=None)
    check(res, "(d) losses after the resume within the (a) tolerance of on's", worst is not None and worst <= tol,
          {"max_gap": worst, "tolerance": tol, "iterations": after})
    res["pass"] = all(c["pass"] for c in res["checks"])
    return res


# --------------------------------------------------------------------------- the runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--port", type=int, default=29700)
    parser.add_argument("--dry-run", action="store_true", help="plan every launch on the CPU, compare nothing")
    parser.add_argument("--selftest", action="store_true", help="check the comparisons on synthetic dumps (CPU)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.selftest:
        return selftest(args.out)
    exp_root = Path(os.environ.setdefault("INFIR2_EXP_ROOT", "/tmp/remainders-exp"))
    s, half, dumps_dir = args.steps, args.steps // 2, args.out / "dumps"
    dumps_dir.mkdir(exist_ok=True)

    def env(name: str, at: str) -> dict[str, str]:
        return {"INFIR2_BF16_MASTERS_DUMP": str(dumps_dir / f"{name}@{{step}}.pt"),
                "INFIR2_BF16_MASTERS_DUMP_STEP": at}

    stale = [n for n in ("off", "off2", "on", "on-stop") if (exp_root / f"rem-{n}").exists()]
    if stale and not args.dry_run:
        sys.exit(f"{exp_root}: rem-{', rem-'.join(stale)} exist (a second launch would resume them): remove them first")
    plan = [("off", False, [], f"1,{half},{s}"), ("off2", False, [], f"1,{s}"), ("on", True, [], f"1,{half},{s}"),
            ("on-stop", True, ["--exit-interval", str(half)], str(half)), ("on-stop", True, [], "0")]
    codes = []
    for i, (name, option, extra, at) in enumerate(plan):
        cmd = train_command(f"rem-{name}", s, args.port + i, option, extra, args.dry_run)
        dump_env = env(name if i < 4 else "on-stop-resume", at)
        codes.append(run(cmd, args.out / f"{name}.txt", {} if args.dry_run else dump_env))
        print(f"{name}: exit {codes[-1]}", flush=True)
    if args.dry_run:
        return 0 if all(c == 0 for c in codes) else 1

    import torch

    from infir2_cpt.reports.runlog import read_logs

    def load(name: str) -> dict:
        return torch.load(dumps_dir / f"{name}.pt")

    dumps = {k: load(k) for k in ("off@1", f"off@{half}", f"off@{s}", "off2@1", f"off2@{s}", "on@1", f"on@{half}",
                                  f"on@{s}")}
    dumps[f"on-stop@{half}"], dumps["on-stop@resume0"] = load(f"on-stop@{half}"), load("on-stop-resume@0")
    logs = {n: read_logs(exp_root / f"rem-{n}" / "logs") for n in ("off", "off2", "on", "on-stop")}
    losses = {n: {it.iteration: it.loss for it in log.iterations if it.loss is not None} for n, log in logs.items()}
    result = evaluate(dumps, losses, {n: log.max_allocated_mb for n, log in logs.items()},
                      [it for _, it in logs["on-stop"].loaded], s)
    result["exit_codes"] = codes
    (args.out / "remainders_check.json").write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["pass"] and all(c == 0 for c in codes) else 1


def selftest(out: Path) -> int:
    """The comparisons on synthetic dumps: one where every check must pass, one with a wrong remainder."""
    import torch

    from infir2_cpt.runtime.optimizer_remainders import split_fp32

    torch.manual_seed(0)

    def dump(masters: dict[str, Any], te: bool) -> dict:
        return {n: {"master": m, "param": split_fp32(m)[0] if te else m.to(torch.bfloat16)} for n, m in masters.items()}

    m1 = {"embedding": torch.randn(64, 8), "final_norm": torch.randn(8)}
    m_half = {n: m + 0.01 for n, m in m1.items()}
    m_end = {n: m + 0.02 for n, m in m1.items()}
    dumps = {"off@1": dump(m1, False), "off2@1": dump(m1, False), "on@1": dump(m1, True), "on@10": dump(m_half, True),
             "off@20": dump(m_end, False), "off2@20": dump(m_end, False), "on@20": dump(m_end, True),
             "on-stop@10": dump(m_half, True), "on-stop@resume0": dump(m_half, True)}
    losses = {"off": {1: 10.0, 11: 9.0}, "off2": {1: 10.0, 11: 9.001}, "on": {1: 10.0, 11: 9.0005},
              "on-stop": {1: 10.0, 11: 9.0009}}
    n = sum(m.numel() for m in m1.values())
    good = evaluate(dumps, losses, {"off": 1000.0 + 2 * n / 2**20, "on": 1000.0}, [10], 20)
    broken = dict(dumps, **{"on@1": {k: dict(v, param=v["param"] + 1) for k, v in dumps["on@1"].items()},
                            "on-stop@resume0": dump(m1, True)})
    bad = evaluate(broken, losses, {"off": 1000.0, "on": 1000.0}, [], 20)
    ok = good["pass"] and not bad["pass"] and sum(not c["pass"] for c in bad["checks"]) >= 3
    (out / "selftest.json").write_text(json.dumps({"good": good, "bad": bad, "ok": ok}, indent=1, default=str))
    print(f"selftest: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
