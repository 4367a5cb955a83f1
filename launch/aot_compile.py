"""Compile the step `launch/train.py` would run, for a TPU slice, on a CPU box: fits? FLOPs? collectives?

  python launch/aot_compile.py --gin stage1.gin --gin model/qwen3-235b-a22b.gin \
      --gin slices/qwen3-235b-a22b-v5p-1024-stage1.gin --topology v5p-1024 [--report out.json]
  python launch/aot_compile.py --gin stage3.gin --preset qwen3-8b --topology v5p-128 --mesh fsdp=64

The gin files and bindings are the training command's: the model, attention (`auto` resolves to
splash for a TPU slice, as it does on the slice), remat, loss chunk, micro-batches, mesh and
expert exchange all come from them, through the same builder the training loop uses
(`qwen3_jax.train.build`). The flags below are shorthands for gin bindings and are printed as
such; nothing else is changed. Settings that work but cost memory or time on the target are named
in the report's NOTES. Prints per-chip memory against HBM, FLOPs per chip vs the model's own
count, the collectives and the step program's fingerprint (train.py prints the same one for the
same config and devices); exits 1 when the step does not fit, 2 on a bad configuration.

`--topology cpu` compiles for this host's devices instead (memory against its RAM).
Report fields and the memory definitions: qwen3_jax/aot.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported (below)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles (or tests) at once
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # silences libtpu probing the host for a TPU

from qwen3_jax import aot, configurables, remat_search, storage  # noqa: E402
from qwen3_jax.errors import TrainingError  # noqa: E402
from qwen3_jax.hlo_stats import program_fingerprint  # noqa: E402
from qwen3_jax.memory import GIB  # noqa: E402
from qwen3_jax.sharding import MeshConfig  # noqa: E402
from qwen3_jax.train.build import build  # noqa: E402


def mesh_bindings(text: str) -> list[str]:
    """'fsdp=64,expert=8' (or ici_/dcn_ names) -> bindings of every MeshConfig field: the named
    sizes, the others at MeshConfig's defaults (as `MeshConfig(ici_fsdp=64, ici_expert=8)`)."""
    sizes = dataclasses.asdict(MeshConfig())
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise ValueError(f"--mesh {text!r}: expected axis=size pairs, e.g. fsdp=64,expert=8")
        k, v = (x.strip() for x in part.split("=", 1))
        k = k if k.startswith(("ici_", "dcn_")) else f"ici_{k}"
        if k not in sizes:
            raise ValueError(f"--mesh {text!r}: unknown axis {k!r}; fields: {', '.join(sizes)}")
        sizes[k] = int(v)
    return [f"MeshConfig.{k}={v}" for k, v in sizes.items()]


def flag_bindings(args) -> list[str]:
    """The shorthand flags as the gin bindings they stand for."""
    out = []
    for flag, name in (("seq_len", "SEQ_LEN"), ("global_batch", "BATCH_SIZE"),
                       ("micro_batches", "train.micro_batches"), ("capacity_factor", "train.capacity_factor")):
        if getattr(args, flag) is not None:
            out.append(f"{name}={getattr(args, flag)}")
    for flag, name in (("attention_impl", "model_config.attention_impl"), ("remat", "model_config.remat"),
                       ("moe_exchange", "train.moe_exchange"), ("aux_scope", "train.aux_scope")):
        if getattr(args, flag) is not None:
            out.append(f"{name}={getattr(args, flag)!r}")
    if args.splash_fused_bwd is not None:
        out.append(f"model_config.splash_fused_bwd={args.splash_fused_bwd == 'true'}")
    if args.mesh:
        out += mesh_bindings(args.mesh)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configurables.add_gin_flags(p, "the training command's gin files (repeatable)")
    p.add_argument("--preset", default=None, help="shorthand for --gin model/PRESET.gin")
    p.add_argument("--topology", required=True, help="e.g. v5p-1024, v6e-256, v5e-256, v4-128, v5p:8x8x8, cpu")
    p.add_argument("--num_slices", type=int, default=1)
    p.add_argument("--mesh", default=None, help="shorthand for MeshConfig bindings: fsdp=64,expert=8")
    p.add_argument("--seq_len", type=int, default=None, help="shorthand for SEQ_LEN=")
    p.add_argument("--global_batch", type=int, default=None, help="shorthand for BATCH_SIZE=")
    p.add_argument("--micro_batches", type=int, default=None, help="shorthand for train.micro_batches=")
    p.add_argument("--attention_impl", default=None, help="shorthand for model_config.attention_impl=")
    p.add_argument("--remat", default=None, help="shorthand for model_config.remat=; 'auto': search (below)")
    p.add_argument("--remat_search", action="store_true",
                   help="compile every remat candidate and pick one (--remat auto: skip the dominated ones)")
    p.add_argument("--remat_candidates", default=None, help="comma-separated policies for the search "
                   "(default: qwen3_jax.remat_search.candidates for the model and platform)")
    p.add_argument("--headroom", type=float, default=None, help="search: fit = peak <= this share of HBM (0.9)")
    p.add_argument("--remat_cache", default=None, help="search: reuse / save each candidate's report in this "
                   "folder, matched by the step program's fingerprint")
    p.add_argument("--splash_fused_bwd", default=None, choices=["true", "false"],
                   help="shorthand for model_config.splash_fused_bwd=")
    p.add_argument("--moe_exchange", default=None, help="shorthand for train.moe_exchange= (auto | ragged_all_to_all | gather)")
    p.add_argument("--capacity_factor", type=float, default=None, help="shorthand for train.capacity_factor=")
    p.add_argument("--aux_scope", default=None, help="shorthand for train.aux_scope=")
    p.add_argument("--hbm_gib", type=float, default=None, help="what-if: HBM per chip instead of the chip's")
    p.add_argument("--report", default=None, help="write the report as JSON here")
    p.add_argument("--hlo_dump", default=None, help="write the compiled HLO text here")
    args = p.parse_args(argv)
    files = list(args.gin) + ([f"model/{args.preset}.gin"] if args.preset else [])
    if not args.gin:
        p.error("give the training command's gin files, e.g. --gin stage1.gin --gin model/qwen3-8b.gin")

    search = args.remat_search or args.remat == "auto"
    if args.remat == "auto":
        args.remat = None
    try:
        extra = flag_bindings(args)
        topo = aot.parse_topology(args.topology, args.num_slices)
        if args.hbm_gib:
            topo["hbm_bytes_per_chip"] = int(args.hbm_gib * GIB)
        model, tc = configurables.read_run(files, list(args.gin_param) + extra)
        print(f"config: {' + '.join(files)}" + "".join(f"\n  --gin_param {b}" for b in args.gin_param + extra),
              flush=True)
        devices = aot.topology_devices(topo)
        search = search or model.remat == "auto"  # the gin files leave it to the search
        if search:
            only = args.remat_candidates.split(",") if args.remat_candidates else None
            policies = remat_search.candidates(model, "cpu" if topo["accelerator"] == "cpu" else "tpu", only)
        else:
            program = build(model, tc, devices, num_slices=args.num_slices, process_count=1)
    except (FileNotFoundError, ValueError, TrainingError, TypeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if search:
        report = run_search(args, files, extra, topo, devices, policies)
    else:
        report = aot.compile_report(program, topo, hlo_dump=args.hlo_dump)
        report["config"] = {"gin": files, "bindings": list(args.gin_param) + extra}
    if report is None:
        return 1
    print(aot.format_report(report) if "error" not in report else
          f"{report['model']} on {report['topology']}, mesh {report['mesh']}: DOES NOT FIT\n  {report['error']}")
    if args.report:
        storage.write_text(args.report, json.dumps(report, indent=2))  # a local file or a gs:// object
    return 0 if report["fits"] else 1


def run_search(args, files: list[str], extra: list[str], topo: dict, devices, policies: list[str]) -> dict | None:
    """Compiles the remat candidates (each the program train.py would run with that
    `model_config.remat`), prints the table and the gin line; returns the chosen one's report
    with the search in `remat_search`, or None when none fits."""
    headroom = args.headroom or remat_search.HEADROOM
    cache = storage.path(args.remat_cache) if args.remat_cache else None  # local or gs://

    def compile_policy(policy: str) -> dict:
        bindings = list(args.gin_param) + extra + [f"model_config.remat={policy!r}"]
        model, tc = configurables.read_run(files, bindings)
        program = build(model, tc, devices, num_slices=args.num_slices, process_count=1)
        lowered = program.lower()
        fingerprint = program_fingerprint(lowered)
        report = cached_report(cache, fingerprint, program) if cache else None
        if report is None:
            print(f"compiling remat={policy!r} (step program {fingerprint}) ...", flush=True)
            report = aot.compile_report(program, topo, lowered=lowered)
            if cache:
                storage.write_text(cache / f"{fingerprint}.json", json.dumps(report, indent=2))
        else:
            print(f"remat={policy!r}: step program {fingerprint} already compiled ({cache})", flush=True)
            report["hbm_bytes_per_chip"] = topo["hbm_bytes_per_chip"]  # this run's HBM (--hbm_gib)
            report["fits"] = report["bytes_per_chip_peak"] <= report["hbm_bytes_per_chip"]
        report["config"] = {"gin": files, "bindings": bindings}
        return report

    choice, report, rows = remat_search.search(compile_policy, policies, headroom, prune=not args.remat_search)
    print(remat_search.format_rows(rows, choice, headroom))
    if choice is None:
        print(f"no remat candidate fits in {headroom:.0%} of HBM")
        return None
    print(f"chosen: model_config.remat = {choice!r}  (record it in the slice gin file)")
    report["remat_search"] = {"headroom": headroom, "choice": choice, "pruned": not args.remat_search,
                              "candidates": rows}
    return report


def cached_report(cache, fingerprint: str, program) -> dict | None:
    """A saved report of this step program (same fingerprint) in `cache`; one saved by an older
    tool without the step-time fields gets them from its HLO dump (`<report>.hlo`) if present."""
    for path in sorted(cache.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except ValueError:
            continue
        if report.get("step_program") != fingerprint or report.get("flops_per_chip") is None:
            continue
        hlo = path.with_suffix(".hlo")
        if "hbm_traffic_bytes_per_chip" not in report and hlo.exists():  # saved by an older tool
            report.update(aot.step_time_fields(report, program.model, hlo.read_text(), 1, report["flops_per_chip"],
                                               report["model_flops_per_chip"], report["collectives"],
                                               report.get("expected_expert_rows_per_device")))
        report.setdefault("host_temp_bytes_per_chip", 0)
        return report
    return None


if __name__ == "__main__":
    sys.exit(main())
