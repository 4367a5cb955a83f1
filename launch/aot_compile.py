"""Compile the real train step for a TPU slice on a CPU box: does it fit, FLOPs, collectives.

  python launch/aot_compile.py --preset qwen3-235b-a22b --topology v5p-1024 --seq_len 4096 \
      --global_batch 1024 --mesh fsdp=64,expert=8 [--num_slices N] [--report out.json]
  python launch/aot_compile.py --gin stage1.gin --topology v5p-1024 [--gin_param K=V ...]

Nothing is allocated: parameters, optimizer state and batch are `ShapeDtypeStruct`s sharded over
the devices of libtpu's topology description (`jax.experimental.topologies`), and XLA:TPU
compiles the step exactly as it would on the slice. Prints per-chip memory (arguments,
temporaries, output, peak) against the chip's HBM, FLOPs per chip vs the model's own count,
tokens per step and the collectives; exits 1 when the step does not fit.

Accelerator names: v5p-N, v4-N (N TensorCores, 2 per chip), v5e-N / v5litepod-N, v6e-N (N chips),
or libtpu's own form `v5p:8x8x8`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles (or tests) at once
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # silences libtpu probing the host for a TPU

GIB = 1024 ** 3
# generation -> (libtpu name, HBM bytes per chip, cores per chip in the accelerator name, 3D torus)
CHIPS = {
    "v4": ("v4", 32 * GIB, 2, True),
    "v5p": ("v5p", 95 * GIB, 2, True),
    "v5e": ("v5e", 16 * GIB, 1, False),
    "v5litepod": ("v5e", 16 * GIB, 1, False),
    "v6e": ("v6e", 32 * GIB, 1, False),
}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16", 8192: "16x16x32"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


def parse_topology(name: str) -> dict:
    """'v5p-1024' / 'v6e-256' / 'v5p:8x8x8' -> {name (libtpu), chips, hbm_bytes_per_chip}."""
    m = re.fullmatch(r"(v\d+[a-z]*|v5litepod)[-:](.+)", name.strip().lower())
    if not m or m.group(1) not in CHIPS:
        raise ValueError(f"unknown TPU accelerator {name!r}; use e.g. v5p-1024, v6e-256, v5e-256, v4-128 "
                         f"or v5p:8x8x8")
    gen, rest = m.groups()
    lib, hbm, cores, is3d = CHIPS[gen]
    if "x" in rest:
        shape = rest
        chips = math.prod(int(s) for s in rest.split("x"))
    else:
        n = int(rest)
        if n % cores:
            raise ValueError(f"{name}: {gen} names count TensorCores ({cores} per chip); {n} is not a multiple")
        chips = n // cores
        table = _SHAPES_3D if is3d else _SHAPES_2D
        if chips not in table:
            raise ValueError(f"{name}: no standard {gen} slice with {chips} chips; known: {sorted(table)}")
        shape = table[chips]
    return {"accelerator": name, "libtpu_name": f"{lib}:{shape}", "chips": chips, "hbm_bytes_per_chip": hbm}


def topology_devices(topo: dict, num_slices: int = 1):
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(topology_name=topo["libtpu_name"], platform="tpu", num_slices=num_slices)
    return list(desc.devices)


def model_flops_per_token(cfg, seq_len: int) -> float:
    """6 × matmul params touched per token + causal attention (6·L·T·N·H), for one train step."""
    from qwen3_jax.params import count_params

    active = count_params(cfg)["active_params"]
    if not cfg.tie_embeddings:
        active -= cfg.vocab_size * cfg.d_model  # the input embedding is a lookup, not a matmul
    return 6.0 * active + 6.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def _trip_count(while_line: str, comps: dict) -> float:
    """Trip count of a scan's while loop: XLA's known_trip_count, else the bound its condition
    compares the counter with (scans count 0..n-1)."""
    t = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
    if t:
        return float(t.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_line)
    consts = [int(c) for line in comps.get(cond.group(1) if cond else "", [])
              for c in re.findall(r"s32\[\]\S*\s+constant\((\d+)\)", line)]
    return float(max(consts)) if consts else 1.0


def collective_summary(hlo_text: str) -> dict:
    """Per collective kind: instructions executed per step and bytes moved (output sizes),
    with ops inside while loops (the layer scan, micro-batches) multiplied by the trip count."""
    comps: dict[str, list[str]] = {}
    entry, cur = None, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            cur = m.group(2)
            comps[cur] = []
            if m.group(1):
                entry = cur
        elif cur is not None:
            comps[cur].append(line)
    mult = defaultdict(float)
    if entry is None:
        return {}
    mult[entry] = 1.0
    stack = [entry]
    while stack:
        c = stack.pop()
        for line in comps.get(c, []):
            for callee in re.findall(r"(?:body|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)", line):
                trip = 1.0
                if " while(" in line and "body=" in line:
                    trip = _trip_count(line, comps)
                if callee in comps and callee != c:
                    mult[callee] += mult[c] * trip
                    stack.append(callee)
    out = {k: {"count": 0, "bytes": 0.0} for k in COLLECTIVES}
    for c, lines in comps.items():
        if not mult.get(c):
            continue
        for line in lines:
            m = re.search(r"=\s*(.+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|ragged-all-to-all|"
                          r"collective-permute)(-start)?\(", line)
            if not m:
                continue
            nbytes = sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
                         for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)))
            out[m.group(2)]["count"] += mult[c]
            out[m.group(2)]["bytes"] += mult[c] * nbytes
    return {k: v for k, v in out.items() if v["count"]}


def aot_compile(cfg, mesh_cfg, seq_len: int, global_batch: int, micro_batches: int, topology: str,
                num_slices: int = 1, *, aux_scope: str = "global", moe_exchange: str = "auto",
                capacity_factor: float | None = None, z_loss: float = 0.0, hlo_dump: str | None = None,
                hbm_bytes_per_chip: int | None = None) -> dict:
    """Compiles the train step for `topology` (× `num_slices`) and returns the report dict."""
    import jax
    import jax.numpy as jnp

    from qwen3_jax import sharding
    from qwen3_jax.params import param_specs
    from qwen3_jax.train.optim import make_optimizer
    from qwen3_jax.train.step import init_state, make_train_step

    topo = parse_topology(topology)
    if hbm_bytes_per_chip:
        topo["hbm_bytes_per_chip"] = hbm_bytes_per_chip
    devices = topology_devices(topo, num_slices)
    chips = topo["chips"] * num_slices
    per_chip = len(devices) // chips
    mesh = sharding.make_mesh(mesh_cfg, devices, num_slices)
    specs = param_specs(cfg)
    fallbacks = sharding.check_shardable(specs, mesh)
    sharding.check_batch(global_batch, micro_batches, mesh)

    optimizer, _ = make_optimizer(1000)
    abstract = jax.eval_shape(lambda: init_state(cfg, optimizer, 0))
    state_sh = sharding.tree_shardings(abstract, specs, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    bsh = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=bsh)
             for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
    step = make_train_step(cfg, optimizer, micro_batches=micro_batches, aux_scope=aux_scope, z_loss=z_loss)
    with sharding.use_rules(mesh, moe_exchange=moe_exchange, capacity_factor=capacity_factor):
        lowered = jax.jit(step, in_shardings=(state_sh, bsh), out_shardings=(state_sh, None),
                          donate_argnums=0).lower(abstract, batch)
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001  XLA refuses programs that exceed HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            need = re.search(r"\(([\d.]+)G\) exceeds available HBM", str(e))
            return {"model": cfg.name, "topology": topology, "chips": topo["chips"] * num_slices,
                    "mesh": dict(mesh.shape), "seq_len": seq_len, "global_batch": global_batch,
                    "micro_batches": micro_batches, "tokens_per_step": global_batch * seq_len,
                    "flops_per_chip": None, "bytes_per_chip_peak": float(need.group(1)) * 1e9 if need else None,
                    "hbm_bytes_per_chip": topo["hbm_bytes_per_chip"], "fits": False,
                    "error": str(e).splitlines()[0][:500]}
    text = compiled.as_text()
    if hlo_dump:
        with open(hlo_dump, "w") as f:
            f.write(text)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hbm = topo["hbm_bytes_per_chip"] // per_chip
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or
               mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    tokens = global_batch * seq_len
    model_flops = model_flops_per_token(cfg, seq_len) * tokens / len(devices)
    flops = float(cost.get("flops", 0.0))
    return {
        "model": cfg.name, "topology": topology, "libtpu_topology": topo["libtpu_name"], "num_slices": num_slices,
        "chips": chips, "devices": len(devices), "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape), "seq_len": seq_len, "global_batch": global_batch, "micro_batches": micro_batches,
        "tokens_per_step": tokens, "attention_impl": cfg.attention_impl, "remat": cfg.remat,
        "moe_exchange": moe_exchange, "capacity_factor": capacity_factor,
        "flops_per_chip": flops * per_chip, "model_flops_per_chip": model_flops * per_chip,
        "flops_ratio_compiled_to_model": flops / model_flops if model_flops else None,
        "bytes_per_chip_arguments": mem.argument_size_in_bytes * per_chip,
        "bytes_per_chip_output": mem.output_size_in_bytes * per_chip,
        "bytes_per_chip_alias": mem.alias_size_in_bytes * per_chip,
        "bytes_per_chip_temp": mem.temp_size_in_bytes * per_chip,
        "bytes_per_chip_peak": peak * per_chip, "hbm_bytes_per_chip": hbm * per_chip,
        "fits": peak <= hbm, "sharding_fallbacks": fallbacks,
        "collectives": collective_summary(text),
    }


def format_report(r: dict) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    lines = [f"{r['model']} on {r['topology']} ({r['libtpu_topology']} x{r['num_slices']} slice(s), "
             f"{r['chips']} chips, {r['device_kind']}), mesh {r['mesh']}",
             f"  batch {r['global_batch']} x {r['seq_len']} = {r['tokens_per_step']:,} tokens/step, "
             f"micro_batches {r['micro_batches']}, attention {r['attention_impl']}, remat {r['remat']}",
             f"  per chip: arguments {g(r['bytes_per_chip_arguments'])}, temporaries {g(r['bytes_per_chip_temp'])}, "
             f"output {g(r['bytes_per_chip_output'])}",
             f"            peak {g(r['bytes_per_chip_peak'])} of {g(r['hbm_bytes_per_chip'])} HBM -> "
             f"{'FITS' if r['fits'] else 'DOES NOT FIT'}",
             f"  FLOPs per chip: compiled {r['flops_per_chip']:.3e}, model {r['model_flops_per_chip']:.3e} "
             f"(ratio {r['flops_ratio_compiled_to_model']:.2f}; full remat adds one forward: ~1.33)"]
    for note in r["sharding_fallbacks"]:
        lines.append(f"  fallback (replicated): {note}")
    lines.append("  collectives per step (count, bytes per chip):")
    for k, v in r["collectives"].items():
        lines.append(f"    {k:<20} {v['count']:8.0f}  {v['bytes'] / GIB:10.2f} GiB")
    return "\n".join(lines)


def _parse_mesh(text: str):
    from qwen3_jax.sharding import MeshConfig

    kw = {}
    for part in filter(None, (text or "").split(",")):
        k, v = part.split("=")
        k = k.strip()
        kw[k if k.startswith(("ici_", "dcn_")) else f"ici_{k}"] = int(v)
    return MeshConfig(**kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gin", action="append", default=[], help="gin file(s) (stage configs carry the mesh)")
    p.add_argument("--gin_param", action="append", default=[])
    p.add_argument("--preset", default=None, help="model preset (instead of / overriding --gin)")
    p.add_argument("--topology", required=True, help="e.g. v5p-1024, v6e-256, v5e-256, v4-128, v5p:8x8x8")
    p.add_argument("--num_slices", type=int, default=1)
    p.add_argument("--mesh", default=None, help="e.g. fsdp=64,expert=8 or ici_fsdp=-1,dcn_data=2")
    p.add_argument("--seq_len", type=int, default=None)
    p.add_argument("--global_batch", type=int, default=None)
    p.add_argument("--micro_batches", type=int, default=None)
    p.add_argument("--attention_impl", default=None)
    p.add_argument("--remat", default=None)
    p.add_argument("--moe_exchange", default="auto")
    p.add_argument("--capacity_factor", type=float, default=None)
    p.add_argument("--aux_scope", default="global")
    p.add_argument("--hbm_gib", type=float, default=None, help="what-if: HBM per chip instead of the chip's")
    p.add_argument("--report", default=None, help="write the report as JSON here")
    p.add_argument("--hlo_dump", default=None, help="write the compiled HLO text here")
    args = p.parse_args(argv)

    from qwen3_jax.config import get_config

    settings = {}
    if args.gin:
        settings = gin_settings(args.gin, args.gin_param)
    cfg = settings.get("cfg")
    if args.preset:
        cfg = get_config(args.preset)
    if cfg is None:
        p.error("give --preset or --gin")
    overrides = {k: v for k, v in (("attention_impl", args.attention_impl), ("remat", args.remat)) if v}
    if "attention_impl" not in overrides and cfg.attention_impl == "reference":
        overrides["attention_impl"] = "splash"  # the TPU kernel; reference attention is O(T^2) memory
    cfg = cfg.replace(**overrides)
    mesh_cfg = _parse_mesh(args.mesh) if args.mesh else settings.get("mesh_cfg") or _parse_mesh("")
    seq_len = args.seq_len or settings.get("seq_len")
    batch = args.global_batch or settings.get("global_batch")
    micro = args.micro_batches or settings.get("micro_batches") or 1
    if not seq_len or not batch:
        p.error("--seq_len and --global_batch are needed (or a gin file that sets them)")
    report = aot_compile(cfg, mesh_cfg, seq_len, batch, micro, args.topology, args.num_slices,
                         aux_scope=args.aux_scope, moe_exchange=args.moe_exchange,
                         capacity_factor=args.capacity_factor, hlo_dump=args.hlo_dump,
                         hbm_bytes_per_chip=int(args.hbm_gib * GIB) if args.hbm_gib else None)
    print(format_report(report) if "error" not in report else
          f"{report['model']} on {report['topology']}, mesh {report['mesh']}: DOES NOT FIT\n  {report['error']}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["fits"] else 1


def gin_settings(files, bindings) -> dict:
    """Model config, mesh, seq_len, batch and micro-batches from the training gin files."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gin
    from train import parse_gin  # launch/train.py

    parse_gin(files, bindings)
    out = {"seq_len": gin.query_parameter("train.seq_len"), "global_batch": gin.query_parameter("train.batch_size")}
    for key, name in (("micro_batches", "train.micro_batches"),):
        try:
            out[key] = gin.query_parameter(name)
        except ValueError:
            pass
    try:
        from qwen3_jax.train.loop import model_config  # gin-configurable model config, when it exists

        out["cfg"] = model_config()
    except (ImportError, TypeError):
        pass
    try:
        from qwen3_jax.sharding import MeshConfig

        out["mesh_cfg"] = gin.get_configurable(MeshConfig)() if gin else None
    except Exception:  # noqa: BLE001  (mesh not gin-registered yet)
        pass
    return out


if __name__ == "__main__":
    sys.exit(main())
