"""Compile bench_aot.py's four cases with MaxText's own AOT tool and print both side by side.

  # compile with MaxText (its own venv: MaxText 0.2.5 needs Python >= 3.12), one case at a time
  python benchmarks/bench_aot_maxtext.py --maxtext_python /work/maxtext-venv/bin/python [--only 30b,8b]
  # print our saved reports (benchmarks/aot_reports/<case>.json) next to MaxText's (also: no flags)
  python benchmarks/bench_aot_maxtext.py --from_json

Each case runs `maxtext.trainers.pre_train.train_compile` (compile_topology=..., the same model,
global batch, sequence length, fsdp/expert mesh, full remat, bf16 compute / fp32 params, dropless
megablox MoE, splash attention, loss in 2048-position pieces) in a subprocess of the MaxText
interpreter. A small driver around its `main` keeps the compiled step, so the report holds
MaxText's printed memory analysis plus the peak, XLA's cost analysis, MaxText's own FLOP
calculator (`calculate_tflops_training_per_device`: 6·N + causal attention, no remat), and, from the
compiled HLO, FLOPs and collectives counted by qwen3_jax/hlo_stats.py as for our own step (async
collectives such as MaxText's ragged all-to-alls read by their output buffer). `--hlo_dir D` keeps the HLO texts, and
`--from_hlo D` recounts the saved reports from them after that counter changes.
Saved: benchmarks/aot_reports/maxtext/<case>.json and <case>.log (the filtered tail of its log).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "benchmarks" / "aot_reports"
MT_REPORTS = REPORTS / "maxtext"
OURS_SAME_JAX = MT_REPORTS / "ours_same_jax"  # control: our step compiled with MaxText's jax/libtpu
GIB = 1024 ** 3
LOG_LIMIT = 48_000  # bytes of MaxText's log kept per case
LOSS_CHUNK = 2048  # our loss_chunk default: positions per piece of the output head + cross-entropy
RESULT_TAG = "BENCH_AOT_MAXTEXT_RESULT "

# name (as in bench_aot.CASES) -> the same configuration in MaxText's terms
CASES = {
    "235b_s1": dict(model="qwen3-235b-a22b", topology="v5p-1024", chips=512, fsdp=64, expert=8,
                    global_batch=1024, seq_len=4096),
    "235b_s3": dict(model="qwen3-235b-a22b", topology="v5p-1024", chips=512, fsdp=128, expert=4,
                    global_batch=512, seq_len=32768),
    "30b": dict(model="qwen3-30b-a3b", topology="v5p-128", chips=64, fsdp=8, expert=8,
                global_batch=256, seq_len=4096),
    "8b": dict(model="qwen3-8b", topology="v5p-128", chips=64, fsdp=64, expert=1,
               global_batch=256, seq_len=4096),
}
MOE = {"qwen3-235b-a22b", "qwen3-30b-a3b"}
TOP_K = 8  # both MoE presets route each token to 8 experts

# config keys copied from MaxText's resolved config into the report
CONFIG_KEYS = ("model_name", "per_device_batch_size", "global_batch_size_to_train_on", "max_target_length",
               "ici_data_parallelism", "ici_fsdp_parallelism", "ici_expert_parallelism",
               "ici_tensor_parallelism", "remat_policy", "attention", "dtype", "weight_dtype", "mu_dtype",
               "sparse_matmul", "megablox", "capacity_factor", "num_vocab_tiling", "scan_layers",
               "load_balance_loss_weight", "opt_type", "gradient_clipping_threshold", "z_loss_multiplier",
               "shard_mode", "allow_split_physical_axes", "num_experts", "num_experts_per_tok", "vocab_size",
               "logits_via_embedding")


def maxtext_args(case: dict) -> list[str]:
    """MaxText `key=value` overrides for one case (after the base.yml path)."""
    per_device = case["global_batch"] / case["chips"]
    args = [
        f"model_name={case['model']}",
        f"compile_topology={case['topology']}", "compile_topology_num_slices=1",
        f"per_device_batch_size={per_device:g}", f"max_target_length={case['seq_len']}",
        "ici_data_parallelism=1", f"ici_fsdp_parallelism={case['fsdp']}",
        f"ici_expert_parallelism={case['expert']}", "ici_tensor_parallelism=1",
        "dcn_data_parallelism=1", "allow_split_physical_axes=true",  # fsdp8 x expert8 on a 4x4x4 torus
        # MaxText's own choice for these models: base.yml's remat_policy 'full' (configs/models/qwen3-*.yml
        # set none); ours is the slice file's, picked by `aot_compile.py --remat auto` (bench_aot.py)
        "remat_policy=full", "attention=flash", "dtype=bfloat16", "weight_dtype=float32",
        f"num_vocab_tiling={case['seq_len'] // LOSS_CHUNK}",
        "dataset_type=synthetic", "enable_checkpointing=false", "run_name=bench_aot_maxtext",
        f"base_output_directory={tempfile.gettempdir()}/bench_aot_maxtext",
    ]
    if case["model"] in MOE:  # dropless, grouped matmuls (megablox), our router aux-loss weight
        args += ["sparse_matmul=true", "megablox=true", "capacity_factor=-1", "load_balance_loss_weight=0.001"]
    return args


# -- driver: runs inside the MaxText interpreter ------------------------------------------------------

def _driver(mt_argv: list[str], hlo_path: str) -> None:
    """Runs MaxText's train_compile.main with its jit_and_compile wrapped to keep the compiled
    step and its config; prints one RESULT_TAG line of JSON (also after a failed compile)."""
    from absl import app

    from maxtext.trainers.pre_train import train_compile
    from maxtext.utils import maxtext_utils

    kept: dict = {}
    inner = train_compile.jit_and_compile

    def keep(*a, **kw):
        kept["config"] = a[8] if len(a) > 8 else kw["config"]
        t = time.time()
        try:
            kept["compiled"] = inner(*a, **kw)
        finally:
            kept["compile_s"] = time.time() - t
        return kept["compiled"]

    train_compile.jit_and_compile = keep

    def run(_):
        t0 = time.time()
        out: dict = {}
        try:
            train_compile.main(mt_argv)
        except Exception as e:  # noqa: BLE001  recorded: an OOM report or MaxText's own error
            out["error"] = f"{type(e).__name__}: {e}"[:4000]
        out["wall_s"] = time.time() - t0
        out["compile_s"] = kept.get("compile_s")
        cfg = kept.get("config")
        if cfg is not None:
            out["config"] = {k: _plain(getattr(cfg, k, None)) for k in CONFIG_KEYS}
            total, weights, attn = maxtext_utils.calculate_tflops_training_per_device(cfg, log=False)
            out["maxtext_tflops_per_device"] = {"total": total, "learnable_weight": weights, "attention": attn}
        compiled = kept.get("compiled")
        if compiled is not None:
            mem = compiled.memory_analysis()
            out["memory"] = {k: int(getattr(mem, k)) for k in dir(mem)
                             if k.endswith("_in_bytes") and isinstance(getattr(mem, k), int)}
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            out["xla_cost_analysis"] = {k: cost.get(k) for k in ("flops", "bytes accessed", "transcendentals")}
            Path(hlo_path).write_text(compiled.as_text())
        print(RESULT_TAG + json.dumps(out), flush=True)

    app.run(run, argv=["train_compile"])


def _plain(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


# -- parent: runs the driver, parses, saves ------------------------------------------------------------

def _our_hlo_tools():
    spec = importlib.util.spec_from_file_location("_aot_compile", ROOT / "launch" / "aot_compile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _base_yml(python: str) -> str:
    code = "import maxtext, os; print(os.path.join(os.path.dirname(maxtext.__file__), 'configs', 'base.yml'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def _filtered_log(text: str) -> str:
    """MaxText's log without the thousands of 'Config param' lines (those of CONFIG_KEYS stay),
    the cost-analysis dict and our RESULT line; the last LOG_LIMIT bytes."""
    keep = []
    for line in text.splitlines():
        m = re.search(r"Config param (\w+):", line)
        if m and m.group(1) not in CONFIG_KEYS:
            continue
        if line.startswith(RESULT_TAG):
            continue
        if line.startswith("Cost analysis:") and len(line) > 400:
            line = line[:400] + " ...(cut)"
        keep.append(line)
    out = "\n".join(keep) + "\n"
    return out[-LOG_LIMIT:]


def collective_bytes(hlo_text: str, ragged_rows: float | None = None) -> dict:
    """qwen3_jax.hlo_stats.collective_summary (the one our reports use) of the HLO text; it reads
    async collectives (`-start` tuples, e.g. MaxText's ragged all-to-alls) by their output."""
    from qwen3_jax import hlo_stats  # here: the --_driver subprocess runs this file under MaxText's python

    return hlo_stats.collective_summary(hlo_text, ragged_rows)


def _oom_bytes(error: str) -> float | None:
    m = re.search(r"Used ([\d.]+)([GMK]) of ([\d.]+)([GMK]) hbm", error)
    if m:
        return float(m.group(1)) * {"G": 1e9, "M": 1e6, "K": 1e3}[m.group(2)]
    m = re.search(r"\(([\d.]+)G\) exceeds available HBM", error)
    return float(m.group(1)) * 1e9 if m else None


def hlo_fields(case: dict, hlo: str) -> dict:
    """FLOPs (qwen3_jax.hlo_stats.hlo_flops) and collectives from a compiled step's HLO text."""
    from qwen3_jax import hlo_stats

    rows = (case["global_batch"] * case["seq_len"] * TOP_K / case["chips"]) if case["model"] in MOE else None
    counted = hlo_stats.hlo_flops(hlo, ragged_rows=rows, causal=True)
    return {"expected_expert_rows_per_device": rows, "flops_per_chip": counted.get("total"),
            "flops_breakdown_per_chip": counted, "collectives": collective_bytes(hlo, rows),
            "hlo_custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))),
            "hlo_kernels": sorted(set(re.findall(r'op_name="[^"]*?(splash\w*|gmm|tgmm)', hlo)))}


def compile_case(name: str, python: str, timeout_s: int, hlo_dir: str | None = None) -> dict:
    case = CASES[name]
    MT_REPORTS.mkdir(parents=True, exist_ok=True)
    argv = ["train_compile", _base_yml(python), *maxtext_args(case)]
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", TF_CPP_MIN_LOG_LEVEL="0")
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    with tempfile.TemporaryDirectory() as tmp:
        hlo_path = os.path.join(tmp, "step.hlo")
        cmd = [python, str(Path(__file__).resolve()), "--_driver", json.dumps(argv), hlo_path]
        t0 = time.time()
        try:
            r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=timeout_s, cwd=tmp)
            log, rc = r.stdout, r.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout or b""
            log, rc = out.decode(errors="replace") if isinstance(out, bytes) else out, None
        wall = time.time() - t0
        res_line = next((ln for ln in reversed(log.splitlines()) if ln.startswith(RESULT_TAG)), None)
        res = json.loads(res_line[len(RESULT_TAG):]) if res_line else {}
        if rc is None:
            res["error"] = f"timed out after {timeout_s} s"
        elif not res_line:
            res["error"] = f"driver exited {rc} without a result: " + log.strip()[-1500:]
        hlo = Path(hlo_path).read_text() if Path(hlo_path).exists() else None
    if hlo and hlo_dir:
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        (Path(hlo_dir) / f"maxtext_{name}.hlo").write_text(hlo)
    # MaxText's own printed memory analysis (cross-check of the driver's numbers)
    printed = re.search(r"Memory analysis: CompiledMemoryStats\((.*)\)", log)
    if printed:
        res["memory_printed"] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", printed.group(1))}
    report = {"case": name, "tool": "maxtext", "maxtext_argv": argv[2:], **case,
              "mesh": {"fsdp": case["fsdp"], "expert": case["expert"]},
              "tokens_per_step": case["global_batch"] * case["seq_len"], "returncode": rc,
              "subprocess_wall_s": wall, **res}
    report["versions"] = _versions(python)
    topo = _our_hlo_tools()
    report["hbm_bytes_per_chip"] = topo.parse_topology(case["topology"])["hbm_bytes_per_chip"]
    mem = res.get("memory")
    if mem:
        peak = mem.get("peak_memory_in_bytes") or (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"]
                                                   - mem["alias_size_in_bytes"] + mem["temp_size_in_bytes"])
        report["bytes_per_chip_peak"] = peak
        report["fits"] = peak <= report["hbm_bytes_per_chip"]
    elif res.get("error"):
        report["fits"] = False if re.search(r"RESOURCE_EXHAUSTED|hbm", res["error"], re.I) else None
        report["bytes_per_chip_peak"] = _oom_bytes(res["error"])
    if "maxtext_tflops_per_device" in res:
        report["maxtext_model_flops_per_chip"] = res["maxtext_tflops_per_device"]["total"] * 1e12
    if hlo:
        report.update(hlo_fields(case, hlo))
    (MT_REPORTS / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (MT_REPORTS / f"{name}.log").write_text(_filtered_log(log))
    return report


def _versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json\n"
            "print(json.dumps({p: m.version(p) for p in ('jax', 'jaxlib', 'libtpu', 'flax', 'maxtext')"
            " if __import__('importlib.util').util.find_spec(p.replace('-', '_')) is not None}))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}


def compile_ours_with(name: str, python: str, timeout_s: int, hlo_dir: str | None = None) -> dict:
    """Control: our step (bench_aot.py's arguments, launch/aot_compile.py) compiled by another
    interpreter, e.g. MaxText's (its jax + libtpu), saved to aot_reports/maxtext/ours_same_jax/."""
    spec = importlib.util.spec_from_file_location("_bench_aot", ROOT / "benchmarks" / "bench_aot.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = OURS_SAME_JAX / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(ROOT / "launch" / "aot_compile.py"), *bench.CASES[name], "--report", str(out)]
    if hlo_dir:
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        cmd += ["--hlo_dump", str(Path(hlo_dir) / f"ours_{name}.hlo")]
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    t0 = time.time()
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        tail = (r.stdout + r.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        tail = f"timed out after {timeout_s} s"
    if not out.exists():
        raise RuntimeError(f"{name}: aot_compile under {python} failed\n{tail}")
    rep = json.loads(out.read_text())
    rep.update(versions=_versions(python), subprocess_wall_s=time.time() - t0)
    out.write_text(json.dumps(rep, indent=1) + "\n")
    return rep


# -- table -----------------------------------------------------------------------------------------

SHORT = {"all-gather": "AG", "all-reduce": "AR", "reduce-scatter": "RS", "all-to-all": "A2A",
         "ragged-all-to-all": "rA2A", "collective-permute": "CP"}


def _g(x):
    return f"{x / GIB:6.1f}" if x is not None else "     -"


def _e(x):
    return f"{x:9.3g}" if x is not None else "        -"


def _ratio(a, b):
    return f"{a / b:6.2f}" if a is not None and b else "     -"


def _coll(r):
    return " ".join(f"{SHORT.get(k, k)} {v.get('bytes_expected', v['bytes']) / GIB:.0f}"
                    for k, v in (r.get("collectives") or {}).items())


def _cols(r: dict, ours: bool) -> dict:
    mem = r.get("memory") or {}
    return {
        "args": r.get("bytes_per_chip_arguments") if ours else mem.get("argument_size_in_bytes"),
        "temp": r.get("bytes_per_chip_temp") if ours else mem.get("temp_size_in_bytes"),
        "peak": r.get("bytes_per_chip_peak"),
        "hlo": r.get("flops_per_chip"),
        "model": r.get("model_flops_per_chip") if ours else r.get("maxtext_model_flops_per_chip"),
        "xla": r.get("xla_cost_analysis_flops_per_chip") if ours else (r.get("xla_cost_analysis") or {}).get("flops"),
    }


def table(names: list[str]) -> str:
    head = (f"{'case':<8} {'tool':<8} {'mesh':<17} {'batch':>11} {'args':>6} {'temp':>6} {'peak':>6} GiB/chip  "
            f"{'HLO FLOPs':>9} {'model FL':>9} {'HLO/mdl':>7} {'XLA cost':>9}  collectives GiB/chip/step")
    lines = [head, "-" * len(head)]
    for name in names:
        ours_p, mt_p = REPORTS / f"{name}.json", MT_REPORTS / f"{name}.json"
        ours = json.loads(ours_p.read_text()) if ours_p.exists() else None
        mt = json.loads(mt_p.read_text()) if mt_p.exists() else None
        same_p = OURS_SAME_JAX / f"{name}.json"
        same = json.loads(same_p.read_text()) if same_p.exists() else None
        cols = {}
        for tool, r in (("ours", ours), ("ours*", same), ("maxtext", mt)):
            if r is None and tool == "ours*":
                continue
            if r is None:
                lines.append(f"{name:<8} {tool:<8} (no saved report)")
                continue
            c = cols[tool] = _cols(r, tool != "maxtext")
            mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1)
            fits = {True: "ok ", False: "OOM", None: "?  "}[r.get("fits")]
            lines.append(f"{name:<8} {tool:<8} {mesh:<17} {r['global_batch']:>5}x{r['seq_len']:<5} "
                         f"{_g(c['args'])} {_g(c['temp'])} {_g(c['peak'])} {fits}     "
                         f"{_e(c['hlo'])} {_e(c['model'])} {' ' + _ratio(c['hlo'], c['model'])} {_e(c['xla'])}  "
                         f"{_coll(r)}")
            if r.get("error"):
                lines.append(f"{'':<8} {'':<8} error: {r['error'].splitlines()[0][:150]}")
        if "ours" in cols and "maxtext" in cols:
            m = cols["maxtext"]
            for label, o in (("ours/mt", cols["ours"]), ("ours*/mt", cols.get("ours*"))):
                if o is None:
                    continue
                lines.append(f"{name:<8} {label:<8} {'':<17} {'':>11} {_ratio(o['args'], m['args'])} "
                             f"{_ratio(o['temp'], m['temp'])} {_ratio(o['peak'], m['peak'])}         "
                             f"{'   ' + _ratio(o['hlo'], m['hlo'])} {'   ' + _ratio(o['model'], m['model'])} "
                             f"{'':>7} {'   ' + _ratio(o['xla'], m['xla'])}")
        lines.append("")
    lines.append("ours: benchmarks/aot_reports/<case>.json (our venv's jax/libtpu); ours*: the same step compiled "
                 "with MaxText's jax/libtpu (aot_reports/maxtext/ours_same_jax/, --ours_python); maxtext: "
                 "aot_reports/maxtext/<case>.json.")
    lines.append("args/temp/peak: per-chip bytes from the compiled memory analysis (peak = XLA's peak, or "
                 "args+out-alias+temp). HLO FLOPs: counted from each compiled HLO by qwen3_jax/hlo_stats.py "
                 "(matmuls + splash/megablox kernels, MoE rows at balanced routing). model FL: ours = "
                 "qwen3_jax.train.metrics, MaxText = its calculate_tflops_training_per_device. XLA cost: "
                 "cost_analysis()['flops'] (no Pallas kernels, loop bodies once). collectives: "
                 "qwen3_jax.hlo_stats.collective_summary, output bytes per chip per step (rA2A: rows a "
                 "device really gets); for maxtext and ours* async ragged all-to-alls are read by their output.")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_driver"]:
        _driver(json.loads(argv[1]), argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--maxtext_python", default=None,
                   help="the interpreter with maxtext installed; without it only the saved reports print")
    p.add_argument("--from_json", action="store_true", help="print the saved reports, compile nothing")
    p.add_argument("--only", default=None, help="comma-separated case names: " + ",".join(CASES))
    p.add_argument("--hlo_dir", default=None, help="also keep each compiled HLO text here (large)")
    p.add_argument("--timeout_s", type=int, default=3600, help="per-case limit for MaxText's compile")
    p.add_argument("--ours_python", default=None, help="also compile our step with this interpreter (control: "
                   "MaxText's jax + libtpu; needs gin-config there) into aot_reports/maxtext/ours_same_jax/")
    p.add_argument("--from_hlo", default=None, help="recount FLOPs/collectives of the saved MaxText (and ours*) "
                   "reports from the HLO texts an earlier --hlo_dir kept (maxtext_<case>.hlo, ours_<case>.hlo)")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(CASES)
    if args.from_hlo:
        for name in names:
            hlo_p, rep_p = Path(args.from_hlo) / f"maxtext_{name}.hlo", MT_REPORTS / f"{name}.json"
            if hlo_p.exists() and rep_p.exists():
                rep = json.loads(rep_p.read_text())
                rep.update(hlo_fields(CASES[name], hlo_p.read_text()))
                rep_p.write_text(json.dumps(rep, indent=1) + "\n")
            hlo_p, rep_p = Path(args.from_hlo) / f"ours_{name}.hlo", OURS_SAME_JAX / f"{name}.json"
            if hlo_p.exists() and rep_p.exists():
                rep = json.loads(rep_p.read_text())
                rep["collectives"] = collective_bytes(hlo_p.read_text(), rep.get("expected_expert_rows_per_device"))
                rep_p.write_text(json.dumps(rep, indent=1) + "\n")
        args.from_json = True
    if not args.from_json and args.maxtext_python:
        for name in names:
            r = compile_case(name, args.maxtext_python, args.timeout_s, args.hlo_dir)
            status = r.get("error", "ok").splitlines()[0][:200]
            print(f"{name}: {status} (compile {r.get('compile_s') or 0:.0f} s, "
                  f"subprocess {r['subprocess_wall_s']:.0f} s)", flush=True)
    if not args.from_json and args.ours_python:
        for name in names:
            r = compile_ours_with(name, args.ours_python, args.timeout_s, args.hlo_dir)
            print(f"{name} (ours, {r['versions']}): fits {r['fits']} ({r['subprocess_wall_s']:.0f} s)", flush=True)
    print(table(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
