"""Train-step time of our step and MaxText 0.2.5's, side by side on this machine's CPU.

  python benchmarks/bench_vs_maxtext.py [--rounds 3] [--warmup 2] [--timed 4] [--only dense,moe]
      [--settings default,matched] [--json benchmarks/reports/vs_maxtext.json]
  python benchmarks/bench_vs_maxtext.py --from_json benchmarks/reports/vs_maxtext.json   # print, run nothing

Shapes (both sides): 4 layers, d_model 512, 8 query / 4 KV heads x 64, vocab 32,768, sequence
1,024, batch 4, fp32 compute and parameters, AdamW; dense: SwiGLU 1,536 (qwen3-0.6b's layout,
tied embeddings); MoE: 16 experts top-4, expert FFN 256, load-balancing loss 0.001
(qwen3-30b-a3b's layout).

Settings:
  default  each side as documented for CPU. Ours: ModelConfig's defaults (moe_impl='auto', the
           blocked expert form on CPU; remat='auto', the fewest-FLOPs policy that fits; attention
           auto) and TrainConfig's (loss in position chunks), through qwen3_jax.train.build.build,
           the builder launch/train.py uses. MaxText: `maxtext.trainers.pre_train.train` with
           base.yml's defaults (remat full, scanned layers, sparse_matmul) plus hardware=cpu,
           attention=dot_product, megablox=false (its Pallas kernel is TPU-only).
  matched  the same work on both sides as far as the two allow: full remat on both, attention
           materialising the scores (ours reference, MaxText dot_product), the same expert form,
           `jax.lax.ragged_dot` over the sorted assignments (ours moe_impl='ragged', MaxText
           sparse_matmul=true megablox=false), and our loss in one piece. For dense, MaxText's
           two settings are the same program (base.yml's remat is already full), so the gap
           between its two dense rows shows the machine's run-to-run noise.

Protocol. A case (dense or MoE, at one setting) is run `--rounds` times; a round is one run of
each side, each a fresh process, in alternating order (round 0: ours first, round 1: MaxText
first, ...), and rounds go over all cases in turn, so a load that comes and goes on a shared
machine falls on both sides alike. Both sides run W + T steps (W = --warmup, T = --timed) after
compiling, and time steps W..W+T-1 (0-based); compilation is never a step. Ours compiles ahead,
then times each step to its loss being ready. MaxText (which also compiles before its loop)
dispatches step i without waiting and then blocks on step i-1's metrics before logging them, so
the log line of step i is written when step i has finished on the device, and step i's time is
the gap between the log lines of steps i-1 and i (their absl timestamps). MaxText's own
"seconds" figure for step i is the gap between two dispatches, which on this version is step
i-2's device time (its entries for steps 0 and 1 hold no step at all, not even the compile); the
JSON keeps it beside the timestamp gaps as a check. A run's value is the median of its T timed
steps; the table shows, per side, min / median / max over runs, the ratio of the medians
(MaxText / ours: > 1 means ours is faster) with the min and max of the per-round ratios, and
"not resolved" where the two sides' [min, max] ranges overlap (adding "every round > 1" when all
the per-round ratios still fall on one side: pairing by round removes the load shared by a
round, which the unpaired ranges keep). The JSON keeps every step's time
and the load average before and after every run.

MaxText runs in its own Python >= 3.12 venv (`--maxtext_venv`, default /work/maxtext-venv),
built here if missing: `python3.12 -m venv`, `pip install maxtext==0.2.5`, then the
decoupled-requirements.txt that ships inside it (DECOUPLE_GCLOUD=TRUE: no Google Cloud clients).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORT = bench_report.REPORTS / "vs_maxtext.json"
RESULT_TAG = "BENCH_VS_MAXTEXT_OURS "
SHAPES = dict(num_layers=4, d_model=512, num_heads=8, num_kv_heads=4, head_dim=64, vocab_size=32768, ffn_dim=1536)
MOE = dict(num_experts=16, num_experts_per_tok=4, moe_ffn_dim=256, router_aux_loss_coef=0.001)
SEQ, BATCH = 1024, 4
LOG_LINE = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d\.\d+) .*completed step: (\d+), seconds: ([0-9.]+)",
                      re.M)
MAXTEXT_SECONDS_LAG = 2  # MaxText's "seconds" for step i is step i-2's device time (see the docstring)


# -- which steps are timed ------------------------------------------------------------------------

def maxtext_log(log: str) -> tuple[list[float], list[float]]:
    """Per logged step (0, 1, ...): the absl timestamp of its log line, in seconds (a day
    boundary crossed mid-run is allowed for), and MaxText's own "seconds" figure."""
    stamps, seconds, day = [], [], 0.0
    for i, m in enumerate(LOG_LINE.finditer(log)):
        if int(m[6]) != i:
            raise ValueError(f"MaxText's log has step {m[6]} where step {i} was expected")
        t = int(m[3]) * 3600 + int(m[4]) * 60 + float(m[5]) + day
        if stamps and t < stamps[-1]:
            day += 86400.0
            t += 86400.0
        stamps.append(t)
        seconds.append(float(m[7]))
    return stamps, seconds


def maxtext_timed(stamps: list[float], warmup: int, timed: int) -> list[float]:
    """Device times of steps warmup..warmup+timed-1: the gaps between consecutive log lines."""
    if warmup < 1 or len(stamps) < warmup + timed:
        raise ValueError(f"MaxText logged {len(stamps)} steps; {warmup + timed} needed, warm-up >= 1")
    return [stamps[j] - stamps[j - 1] for j in range(warmup, warmup + timed)]


# -- summary --------------------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def summarise(ours: list[float], theirs: list[float]) -> dict:
    """Per-run values of the two sides, paired by round (ours[i] and theirs[i] ran in round i):
    each side's min / median / max, the ratio of medians MaxText / ours, the min and max of the
    per-round ratios, and whether the two [min, max] ranges are apart (resolved)."""
    if not ours or len(ours) != len(theirs):
        raise ValueError(f"need the same number of runs per side, got {len(ours)} and {len(theirs)}")
    o, m = spread(ours), spread(theirs)
    rounds = [t / s for s, t in zip(ours, theirs)]
    return {"ours": o, "maxtext": m, "ratio": m["median"] / o["median"],
            "round_ratio_min": min(rounds), "round_ratio_max": max(rounds),
            "resolved": o["max"] < m["min"] or m["max"] < o["min"]}


def run_values(case: dict, side: str) -> list[float]:
    """A case's per-run values of one side, in round order."""
    runs = sorted((r for r in case["runs"] if r["side"] == side), key=lambda r: r["round"])
    return [r["step_s"] for r in runs]


def paired(case: dict) -> tuple[list[float], list[float]]:
    """The runs of the rounds both sides finished."""
    done = {r["round"] for r in case["runs"] if r["side"] == "ours"} & \
           {r["round"] for r in case["runs"] if r["side"] == "maxtext"}
    keep = {**case, "runs": [r for r in case["runs"] if r["round"] in done]}
    return run_values(keep, "ours"), run_values(keep, "maxtext")


def markdown(report: dict) -> str:
    """The table of a report written by this script (or transcribed into its format)."""
    p = report.get("protocol", {})
    loads = [x for c in report["cases"] for r in c["runs"] for x in (r.get("load_before"), r.get("load_after")) if x]
    lines = [bench_report.provenance(report) + "."]
    if p.get("timed_steps"):
        warm = f"{p['warmup']} warm-up step" + ("s" if p["warmup"] != 1 else "")
        lines.append(f"s/step; a run = the median of steps {p['timed_steps']} (0-based, after the compile and "
                     f"{warm}) on each side; min / median / max over runs; "
                     "ratio = MaxText / ours of the medians [min, max of the per-round ratios].")
    if p.get("note"):
        lines.append(p["note"])
    finished = [len(paired(c)[0]) for c in report["cases"]]
    if p.get("rounds") and min(finished) < p["rounds"]:
        lines.append(f"{p['rounds']} rounds were planned; the run was stopped before all finished "
                     "(the rounds column: the rounds both sides finished).")
    if loads:
        one_min = [x[0] for x in loads]
        lines.append(f"Load average (1 min) around the runs: {min(one_min):.1f} to {max(one_min):.1f}.")
    lines += ["", "| case | setting | rounds | ours s/step | MaxText s/step | MaxText / ours | resolved |",
              "|---|---|---|---|---|---|---|"]
    for case in report["cases"]:
        ours, theirs = paired(case)
        if not ours:
            lines.append(f"| {case['case']} | {case['setting']} | 0 | - | - | - | - |")
            continue
        s = summarise(ours, theirs)

        def side(d):
            return f"{d['min']:.2f} / {d['median']:.2f} / {d['max']:.2f}" if d["n"] > 1 else f"{d['median']:.2f}"

        ratio = f"{s['ratio']:.2f}x" + (f" [{s['round_ratio_min']:.2f}, {s['round_ratio_max']:.2f}]"
                                         if s["ours"]["n"] > 1 else "")
        verdict = "yes" if s["resolved"] and s["ours"]["n"] > 1 else "single run" if s["ours"]["n"] == 1 \
            else "not resolved" + (" (every round > 1)" if s["round_ratio_min"] > 1 else
                                   " (every round < 1)" if s["round_ratio_max"] < 1 else "")
        lines.append(f"| {case['case']} | {case['setting']} | {s['ours']['n']} | {side(s['ours'])} | "
                     f"{side(s['maxtext'])} | {ratio} | {verdict} |")
    return "\n".join(lines) + "\n"


# -- MaxText --------------------------------------------------------------------------------------

def python312() -> str | None:
    """A Python >= 3.12 that runs: on PATH, else pyenv's (its shim may be on PATH but not enabled)."""
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = [shutil.which("python3.12"), shutil.which("python3.13"),
             *sorted(glob.glob(f"{pyenv}/versions/3.1[2-9]*/bin/python3"))]
    for py in filter(None, found):
        ok = subprocess.run([py, "-c", "import sys; sys.exit(sys.version_info < (3, 12))"], capture_output=True)
        if ok.returncode == 0:
            return py
    return None


def maxtext_site(py: Path) -> Path:
    out = subprocess.run([str(py), "-c", "import maxtext, pathlib; print(pathlib.Path(maxtext.__file__).parent)"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


def ensure_maxtext(venv: Path) -> Path:
    """The MaxText interpreter, installing the venv first when it is missing."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import maxtext"], capture_output=True).returncode == 0:
        return py
    base = python312()
    if base is None:
        sys.exit("MaxText 0.2.5 needs Python >= 3.12: none found on PATH or under pyenv")
    print(f"installing MaxText 0.2.5 into {venv} with {base} (several minutes)", flush=True)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "maxtext==0.2.5"], check=True)
    reqs = maxtext_site(py).parent / "dependencies" / "requirements" / "generated_requirements" / \
        "decoupled-requirements.txt"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(reqs)], check=True)
    return py


def maxtext_args(case: str, setting: str, steps: int, out_dir: str) -> list[str]:
    args = ["dataset_type=synthetic", "hardware=cpu", "skip_jax_distributed_system=true",
            "enable_checkpointing=false", "override_model_config=true", f"steps={steps}",
            f"run_name=bench_vs_maxtext_{case}_{setting}", f"base_output_directory={out_dir}",
            "base_emb_dim=512", "base_num_query_heads=8", "base_num_kv_heads=4", "base_num_decoder_layers=4",
            "head_dim=64", "vocab_size=32768", "base_mlp_dim=1536", f"max_target_length={SEQ}",
            f"per_device_batch_size={BATCH}", "attention=dot_product", "dtype=float32", "weight_dtype=float32"]
    if case == "dense":
        args.append("model_name=qwen3-0.6b")
    else:
        args += ["model_name=qwen3-30b-a3b", "num_experts=16", "num_experts_per_tok=4", "base_moe_mlp_dim=256",
                 "megablox=false", "sparse_matmul=true", "load_balance_loss_weight=0.001"]
    if setting == "matched":
        args.append("remat_policy=full")
    return args


def run_maxtext(py: Path, case: str, setting: str, warmup: int, timed: int) -> dict:
    site = maxtext_site(py)
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(py), "-m", "maxtext.trainers.pre_train.train", str(site / "configs" / "base.yml"),
               *maxtext_args(case, setting, warmup + timed, out)]
        env = dict(os.environ, DECOUPLE_GCLOUD="TRUE", JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out)
    log = proc.stdout + proc.stderr
    try:
        stamps, seconds = maxtext_log(log)
        timed_s = maxtext_timed(stamps, warmup, timed)
    except ValueError as e:
        error = e
    else:
        error = None
    if proc.returncode or error:
        tail = "\n".join(log.splitlines()[-30:])
        raise RuntimeError(f"MaxText {case}/{setting} failed (rc {proc.returncode}; {error}):\n{tail}")
    losses = re.findall(r"completed step: \d+, .*?loss: ([0-9.]+)", log)
    # the check: MaxText's own figure for the timed steps, where it logged one (two steps late)
    lag = MAXTEXT_SECONDS_LAG
    return dict(step_s=statistics.median(timed_s), timed_s=timed_s,
                maxtext_seconds=seconds, maxtext_seconds_for_timed=seconds[warmup + lag: warmup + timed + lag],
                loss=float(losses[-1]) if losses else None, cmd=" ".join(cmd[1:]))


# -- ours -----------------------------------------------------------------------------------------

def our_config(case: str, setting: str):
    from qwen3_jax.config import get_config

    preset = "qwen3-0.6b" if case == "dense" else "qwen3-30b-a3b"
    over = dict(SHAPES, compute_dtype="float32", param_dtype="float32", **(MOE if case == "moe" else {}))
    if setting == "matched":
        over.update(remat="full", attention_impl="reference", **({"moe_impl": "ragged"} if case == "moe" else {}))
    return get_config(preset, **over)


def ours_worker(case: str, setting: str, warmup: int, timed: int) -> None:
    """One run of our step in this process; prints one tagged JSON line."""
    import jax
    import numpy as np

    from qwen3_jax.model.moe_compute import resolve_impl
    from qwen3_jax.train.build import build
    from qwen3_jax.train.config import TrainConfig

    cfg = our_config(case, setting)
    extra = {} if setting == "default" else {"loss_chunk": None}
    tc = TrainConfig(steps=100, seq_len=SEQ, batch_size=BATCH, checkpoint_every=100, **extra)
    prog = build(cfg, tc, jax.devices()[:1])
    state = prog.init_state()
    rng = np.random.RandomState(0)
    tok = rng.randint(0, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
    batch = dict(tokens=tok, targets=np.roll(tok, -1, 1), loss_mask=np.ones((BATCH, SEQ), np.float32),
                 segment_ids=np.ones((BATCH, SEQ), np.int32),
                 positions=np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)))
    step = prog.compiled or prog.lower().compile()  # compiled before step 0 (remat='auto': by build())
    times, loss = [], None
    for _ in range(warmup + timed):
        t = time.perf_counter()
        state, m = step(state, batch)
        loss = float(jax.block_until_ready(m["loss"]))
        times.append(time.perf_counter() - t)
    info = dict(remat=prog.model.remat, attention=prog.attention, loss_chunk=tc.loss_chunk,
                moe_impl=resolve_impl(cfg.moe_impl, "cpu", cfg.d_model, cfg.moe_ffn_dim) if cfg.is_moe else "-")
    print(RESULT_TAG + json.dumps(dict(step_s=statistics.median(times[warmup:]), timed_s=times[warmup:],
                                       logged_s=times, loss=loss, info=info)), flush=True)


def run_ours(case: str, setting: str, warmup: int, timed: int) -> dict:
    cmd = [sys.executable, __file__, "--ours_worker", case, setting, "--warmup", str(warmup), "--timed", str(timed)]
    # this checkout's qwen3_jax, not whichever one the environment has installed
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"ours {case}/{setting} failed (rc {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_TAG):])


# -- driver ---------------------------------------------------------------------------------------

def timed_run(side: str, rnd: int, fn, *args) -> dict:
    before, t = list(os.getloadavg()), time.time()
    result = fn(*args)
    return dict(side=side, round=rnd, **result, wall_s=time.time() - t, load_before=before,
                load_after=list(os.getloadavg()))


def run_all(args, report: dict, path: Path) -> None:
    mt_py = ensure_maxtext(Path(args.maxtext_venv))
    report["maxtext_python"] = subprocess.run([str(mt_py), "--version"], capture_output=True, text=True).stdout.strip()
    cases = {(c["case"], c["setting"]): c for c in report["cases"]}
    for rnd in range(args.rounds):
        for (case, setting), entry in cases.items():
            sides = [("ours", run_ours, (case, setting, args.warmup, args.timed)),
                     ("maxtext", run_maxtext, (mt_py, case, setting, args.warmup, args.timed))]
            for side, fn, fn_args in sides if rnd % 2 == 0 else sides[::-1]:
                try:
                    run = timed_run(side, rnd, fn, *fn_args)
                except RuntimeError as e:  # kept, and the round left unpaired: the table skips it
                    entry.setdefault("failures", []).append(dict(side=side, round=rnd, error=str(e)[-2000:]))
                    print(f"round {rnd} {case}/{setting} {side}: FAILED\n{e}", flush=True)
                    bench_report.write(path, report)
                    continue
                entry["runs"].append(run)
                if side == "ours":
                    entry["ours_info"] = run.pop("info")
                print(f"round {rnd} {case}/{setting} {side}: {run['step_s']:.2f} s/step (timed "
                      + ", ".join(f"{x:.2f}" for x in run["timed_s"])
                      + f"; loss {run['loss']}; load {run['load_before'][0]:.1f})", flush=True)
                bench_report.write(path, report)  # after every run: an interrupted benchmark keeps its rounds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="runs per side and case, the sides interleaved")
    p.add_argument("--warmup", type=int, default=2, help="steps run before the timed ones (compile excluded)")
    p.add_argument("--timed", type=int, default=4, help="steps timed per run")
    p.add_argument("--only", default="dense,moe")
    p.add_argument("--settings", default="default,matched")
    p.add_argument("--maxtext_venv", default="/work/maxtext-venv")
    p.add_argument("--json", default=str(REPORT), help="where the results go (written after every run)")
    p.add_argument("--from_json", metavar="FILE", help="print the table of a saved report; run nothing")
    p.add_argument("--ours_worker", nargs=2, metavar=("CASE", "SETTING"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.from_json:
        print(markdown(bench_report.load(args.from_json)), end="")
        return 0
    if args.ours_worker:
        ours_worker(*args.ours_worker, args.warmup, args.timed)
        return 0
    if args.rounds < 1 or args.warmup < 1 or args.timed < 1:
        p.error("--rounds, --warmup and --timed must be >= 1 (step 0 is never timed)")
    report = {**bench_report.header("bench_vs_maxtext"),
              "protocol": {"rounds": args.rounds, "warmup": args.warmup, "timed": args.timed,
                           "timed_steps": f"{args.warmup}-{args.warmup + args.timed - 1}",
                           "maxtext_timing": "gaps between the log lines of consecutive steps (absl timestamps)",
                           "order": "per round over all cases; ours first in even rounds, MaxText first in odd"},
              "shapes": {**SHAPES, "seq_len": SEQ, "batch": BATCH, "moe": MOE},
              "cases": [{"case": c, "setting": s, "runs": []} for s in args.settings.split(",")
                        for c in args.only.split(",")]}
    path = Path(args.json)
    run_all(args, report, path)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    bench_report.write(path, report)
    print(f"\nresults: {path}\n")
    print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
