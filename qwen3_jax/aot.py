"""Ahead-of-time compile of the train step for a TPU slice (or this host): fits? FLOPs? collectives?

`launch/aot_compile.py` is the command; this module holds the slice descriptions and the report.
Nothing is allocated: parameters, optimizer state and batch are `ShapeDtypeStruct`s sharded over
the devices of libtpu's topology description (`jax.experimental.topologies`), and XLA:TPU
compiles the step `qwen3_jax.train.build` makes, the one the training loop runs.

Memory (`compiled.memory_analysis()`, XLA's CompiledMemoryStats; the fields: qwen3_jax.memory):
`fits` compares `peak_memory_in_bytes` with HBM: the heap-simulated peak over the compiled
schedule, arguments and outputs included, which is also what XLA:TPU checks when it refuses a
program ("the total memory required for HLO temporaries (X G) exceeds available HBM"). It does not
use `temp_size_in_bytes`, and neither do we: on TPU that figure is not liveness-aware. libtpu
reports more than the temp allocation of its buffer-assignment dump, about the size of the layer
scan's stacked per-layer buffers more, so arguments + temp overstate what a step needs (a step can
compile and fit while arguments + temp exceed HBM). On CPU and GPU it is the size of the
preallocated temp allocation, which the heap simulator packs.

Accelerator names: v5p-N, v4-N (N TensorCores, 2 per chip), v5e-N / v5litepod-N, v6e-N (N chips),
libtpu's own form `v5p:8x8x8`, or `cpu` (this host's devices, against its RAM).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from qwen3_jax import sharding, step_time, storage
from qwen3_jax.hlo_stats import collective_summary, hlo_flops, program_fingerprint
from qwen3_jax.memory import GIB, MEMORY_FIELDS, cpu_device_memory, peak_bytes
from qwen3_jax.params import count_params
from qwen3_jax.train.metrics import flops_per_token

# generation -> (libtpu name, HBM bytes per chip, cores per chip in the accelerator name, 3D torus)
CHIPS = {
    "v4": ("v4", 32 * GIB, 2, True),
    "v5p": ("v5p", 95 * GIB, 2, True),
    "v5e": ("v5e", 16 * GIB, 1, False),
    "v5litepod": ("v5e", 16 * GIB, 1, False),
    "v6e": ("v6e", 32 * GIB, 1, False),
    "v7x": ("tpu7x", 192 * 10**9, 2, True),  # libtpu: two devices (TensorCores) per chip
}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16", 8192: "16x16x32"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def parse_topology(name: str, num_slices: int = 1) -> dict:
    """'v5p-1024' / 'v6e-256' / 'v5p:8x8x8' -> {name (libtpu), chips, hbm_bytes_per_chip}; 'cpu':
    this host's devices, each with an equal share of its RAM."""
    if name.strip().lower() == "cpu":
        n = len(jax.devices("cpu"))
        return {"accelerator": "cpu", "libtpu_name": f"host ({n} cpu devices)", "chips": n, "num_slices": 1,
                "hbm_bytes_per_chip": cpu_device_memory(), "wrap": (False, False, False)}
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
    return {"accelerator": name, "libtpu_name": f"{lib}:{shape}", "chips": chips, "num_slices": num_slices,
            "hbm_bytes_per_chip": hbm, "wrap": torus_wrap(shape, is3d)}


def torus_wrap(shape: str, is3d: bool) -> tuple[bool, bool, bool]:
    """Which axes of the slice have wraparound links, as the hardware has them: v4 / v5p slices
    built of whole 4x4x4 cubes (v5p-128 and up) are tori in every axis, smaller ones are open
    meshes; v5e / v6e wrap an axis that spans the whole 16-chip pod edge (16x16: both, 8x16: one).

    libtpu's topology description has no wraparound unless told (`wrap`), and on a mesh without
    it XLA:TPU's all-gather decomposer rewrites every FSDP all-gather over the slice into an
    all-reduce of a shard-padded buffer (2x the wire bytes). The slice itself reports its links,
    so only the AOT description needs this."""
    dims = [int(s) for s in shape.split("x")]
    if is3d:
        return (all(d % 4 == 0 for d in dims),) * 3
    return tuple(d == 16 for d in dims) + (False,) * (3 - len(dims))


def topology_devices(topo: dict) -> list:
    """The devices of the slice(s) `topo` describes (libtpu's description; nothing to run on)."""
    if topo["accelerator"] == "cpu":
        return list(jax.devices("cpu"))
    desc = topologies.get_topology_desc(topology_name=topo["libtpu_name"], platform="tpu",
                                        num_slices=topo.get("num_slices", 1),
                                        wrap=topo.get("wrap", (False, False, False)))
    return list(desc.devices)


def _flops_split(cfg, seq_len: int, tokens_per_device: float, counted: dict) -> dict:
    """Compiled vs model FLOPs for the attention kernels and for the rest (matmuls), when the
    attention ran as a kernel (splash) whose FLOPs the HLO count can tell apart. The model's
    attention share is its count at seq_len minus its count at length 0 (matmuls only)."""
    if not counted.get("attention_kernel"):
        return {}
    matmul = flops_per_token(cfg, 0) * tokens_per_device
    attention = flops_per_token(cfg, seq_len) * tokens_per_device - matmul
    return {"flops_ratio_matmul": (counted["total"] - counted["attention_kernel"]) / matmul,
            "flops_ratio_attention": counted["attention_kernel"] / attention,
            "model_attention_share": attention / (attention + matmul)}


def compile_report(program, topo: dict, hlo_dump: str | None = None, lowered=None) -> dict:
    """Compiles `program` (from `qwen3_jax.train.build.build` on `topo`'s devices) and returns the
    report: per-chip memory against HBM, FLOPs counted from the HLO vs the model's own count,
    collectives. `topo`: `parse_topology(...)` (its `hbm_bytes_per_chip` may be a what-if)."""
    cfg, tc, mesh = program.model, program.train, program.mesh
    devices = list(mesh.devices.flat)
    chips = topo["chips"] * topo.get("num_slices", 1) if topo["accelerator"] != "cpu" else len(devices)
    per_chip = max(len(devices) // chips, 1)
    tokens = tc.batch_size * tc.seq_len
    lowered = program.lower() if lowered is None else lowered
    head = {"model": cfg.name, "topology": topo["accelerator"], "libtpu_topology": topo["libtpu_name"],
            "num_slices": topo.get("num_slices", 1), "chips": chips, "devices": len(devices),
            "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "seq_len": tc.seq_len,
            "global_batch": tc.batch_size, "micro_batches": tc.micro_batches, "tokens_per_step": tokens,
            "attention_impl": program.attention, "attention_impl_config": cfg.attention_impl,
            "splash_fused_bwd": cfg.splash_fused_bwd, "remat": cfg.remat, "loss_chunk": tc.loss_chunk,
            "aux_scope": tc.aux_scope, "moe_exchange": tc.moe_exchange, "capacity_factor": tc.capacity_factor,
            "step_program": program_fingerprint(lowered), "notes": notes(program),
            "hbm_bytes_per_chip": topo["hbm_bytes_per_chip"]}
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001  XLA refuses programs that exceed HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = re.search(r"\(([\d.]+)([KMGT])\) exceeds available HBM", str(e))
        scale = {"K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 * GIB}
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        vmem = "Vmem" in str(e)  # a kernel's tiles exceed the core's on-chip VMEM: its block sizes, not HBM
        return {**head, "flops_per_chip": None,
                "bytes_per_chip_peak": float(need.group(1)) * scale[need.group(2)] if need else None,
                "peak_source": ("a Pallas kernel's scoped VMEM (its block sizes; HBM not reached)" if vmem else
                                "XLA:TPU's RESOURCE_EXHAUSTED message (HLO temporaries, GiB)"), "fits": False,
                "error": " | ".join(lines[:4 if vmem else 1])[:1500] + (
                    " | hint: model_config.splash_fused_bwd=False (splash's separate dQ kernel: smaller tiles)"
                    if vmem and program.attention == "splash" and cfg.splash_fused_bwd else "")}
    text = compiled.as_text()
    if hlo_dump:
        storage.write_text(hlo_dump, text)  # a local file or a gs:// object
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hbm = topo["hbm_bytes_per_chip"] // per_chip
    live_io = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    peak, peak_source = peak_bytes(mem, devices[0].platform)
    model_flops = flops_per_token(cfg, tc.seq_len) * tokens / len(devices)
    ragged_rows = None
    teacher = program.distill.cfg if program.distill is not None else None
    moe = cfg if cfg.num_experts else teacher if teacher is not None and teacher.num_experts else None
    if moe is not None and mesh.shape.get("expert", 1) > 1:  # rows one device's experts get per micro-batch
        # (a dense student's MoE teacher: the teacher's experts; both MoE: the student's top-k)
        ragged_rows = tokens * moe.num_experts_per_tok / (sharding.batch_shards(mesh) * tc.micro_batches)
    counted = hlo_flops(text, ragged_rows=ragged_rows, causal=True)
    flops = counted.get("total", 0.0)
    eight_bit = counted.get("eight_bit", 0.0)  # 8-bit training (qwen3_jax.quant): its share of the matmuls
    collectives = collective_summary(text, ragged_rows)
    host = int(getattr(mem, "host_temp_size_in_bytes", 0) or 0) * per_chip
    report = {
        **head,
        "flops_per_chip": flops * per_chip, "model_flops_per_chip": model_flops * per_chip,
        "flops_ratio_compiled_to_model": flops / model_flops if model_flops else None,
        "quantization": cfg.quantization, "eight_bit_flops_share": eight_bit / flops if flops else 0.0,
        **_flops_split(cfg, tc.seq_len, tokens / len(devices), counted),
        "flops_breakdown_per_chip": {k: v * per_chip for k, v in counted.items()},
        "xla_cost_analysis_flops_per_chip": float(cost.get("flops", 0.0)) * per_chip,
        "expected_expert_rows_per_device": ragged_rows,
        "bytes_per_chip_arguments": mem.argument_size_in_bytes * per_chip,
        "bytes_per_chip_output": mem.output_size_in_bytes * per_chip,
        "bytes_per_chip_alias": mem.alias_size_in_bytes * per_chip,
        "bytes_per_chip_temp": mem.temp_size_in_bytes * per_chip,
        "bytes_per_chip_temp_at_peak": max(peak - live_io, 0) * per_chip,
        "bytes_per_chip_peak": peak * per_chip, "peak_source": peak_source, "hbm_bytes_per_chip": hbm * per_chip,
        "fits": peak <= hbm, "memory_fields": MEMORY_FIELDS, "sharding_fallbacks": program.sharding_fallbacks,
        "host_temp_bytes_per_chip": host, "xla_cost_analysis_bytes_accessed_per_chip":
            float(cost.get("bytes accessed", 0.0)) * per_chip,
        "collectives": collectives, **step_time_fields(head, cfg, text, per_chip, flops, model_flops, collectives,
                                                       ragged_rows, eight_bit),
    }
    if program.rollout is not None:  # on-policy distillation: the sampling program runs before each step
        report["rollout"] = rollout_report(program, hbm, per_chip)
        report["fits"] = report["fits"] and report["rollout"]["fits"]
    return report


def rollout_report(program, hbm_per_device: int, per_chip: int) -> dict:
    """Memory and FLOPs of the on-policy rollout (qwen3_jax.train.onpolicy) compiled for the same
    devices: the student's parameters, the prompts and the KV cache of prompt + completion."""
    compiled = program.lower_rollout().compile()
    mem = compiled.memory_analysis()
    peak, _ = peak_bytes(mem, program.mesh.devices.flat[0].platform)
    tc = program.train
    return {"prompt_len": tc.onpolicy_prompt_len, "completion_len": tc.seq_len - tc.onpolicy_prompt_len + 1,
            "bytes_per_chip_peak": peak * per_chip, "bytes_per_chip_temp": mem.temp_size_in_bytes * per_chip,
            "fits": peak <= hbm_per_device}


def step_time_fields(report_head: dict, cfg, hlo_text: str, per_chip: int, flops: float, model_flops: float,
                     collectives: dict, ragged_rows: float | None = None, eight_bit: float = 0.0) -> dict:
    """HBM and host-offload bytes counted from the compiled HLO and the step-time estimate
    (`qwen3_jax.step_time`) for a TPU slice (FLOPs per device; no estimate on CPU)."""
    out = {"hbm_traffic_bytes_per_chip": step_time.hbm_bytes(hlo_text, ragged_rows) * per_chip,
           "host_offload_bytes_per_chip": step_time.offload_bytes(hlo_text) * per_chip}
    chip = step_time.chip_for(report_head["libtpu_topology"])
    if chip is None or report_head["topology"] == "cpu":
        return out
    slices = report_head.get("num_slices", 1)
    params = 4.0 * count_params(cfg)["total_params"]  # fp32 gradients
    t = step_time.estimate(chip, flops=flops * per_chip, model_flops=model_flops * per_chip,
                           hbm_bytes=out["hbm_traffic_bytes_per_chip"],
                           ici_wire_bytes=step_time.ici_wire_bytes(collectives),
                           dcn_wire_bytes=step_time.dcn_wire_bytes(params, report_head["chips"] // slices, slices),
                           offload_bytes=out["host_offload_bytes_per_chip"], eight_bit_flops=eight_bit * per_chip,
                           eight_bit_rate=step_time.eight_bit_rate(step_time.family(report_head["libtpu_topology"]),
                                                                   cfg.quantization))
    calibrated = step_time.calibrate(step_time.family(report_head["libtpu_topology"]), t, model_flops * per_chip)
    return {**out, "step_time": {
        **t, "chip_figures": chip.source, "overlap": step_time.OVERLAP, "calibrated": calibrated,
        "label": "modelled, not measured (qwen3_jax/step_time.py): the terms and estimate_s put the compiled "
                 "program's counts on the chip's published peaks (uncalibrated; lower_bound_s: a bound); "
                 "'calibrated' is the prediction (shares of the peaks fitted on measured steps)",
        "measured_from_program": ["bytes_per_chip_*", "flops_per_chip", "flops_breakdown_per_chip", "collectives",
                                  "hbm_traffic_bytes_per_chip", "host_offload_bytes_per_chip"]}}


def notes(program) -> list[str]:
    """Settings that work but cost memory or time on the target: said in the report, not changed."""
    cfg, platform = program.model, program.mesh.devices.flat[0].platform
    out = []
    if program.attention == "reference" and program.train.seq_len > 1024:
        out.append(f"attention_impl={cfg.attention_impl!r} materialises the [B,N,T,T] scores (O(T^2) memory) at "
                   f"SEQ_LEN={program.train.seq_len}; 'auto' picks the memory-efficient kernel for {platform}")
    if platform == "tpu" and cfg.compute_dtype == "float32":
        out.append("compute_dtype='float32' on TPU: matmuls run at a fraction of the bf16 rate")
    if platform == "tpu" and cfg.is_moe and cfg.moe_impl == "dense" and program.mesh.shape.get("expert", 1) == 1:
        out.append(f"moe_impl='dense' runs all {cfg.num_experts} experts on every token "
                   f"({cfg.num_experts / cfg.num_experts_per_tok:.0f}x the expert FLOPs); 'ragged_dot' or "
                   f"'megablox' run the chosen ones")
    fam = step_time.family(program.mesh.devices.flat[0].device_kind)
    if cfg.quantization and platform != "cpu" and not step_time.eight_bit_rate(fam, cfg.quantization):
        out.append(f"quantization={cfg.quantization!r}: {fam or platform} has no fast {cfg.quantization} matmul unit; "
                   f"the 8-bit matmuls are estimated at the bf16 rate (no speed-up, extra quantize work)")
    cp = program.mesh.shape.get("context", 1)
    if cp > 1:  # model/context_parallel.py: the one CP form there is; what it moves, said
        T, itemsize = program.train.seq_len, jnp.dtype(cfg.compute_dtype).itemsize
        kv_mib = 2 * T * cfg.num_kv_heads * cfg.head_dim * itemsize / 2**20
        out.append(f"context parallelism {cp}: all-gather K/V (zig-zag balanced); each layer gathers K,V of "
                   f"{T:,} tokens per sequence ({kv_mib:,.0f} MiB, {cfg.num_kv_heads} kv heads) forward and "
                   f"reduce-scatters their gradients backward; ring attention (the same bytes in CP steps "
                   f"overlapped with compute) is not implemented")
    if platform == "tpu" and cfg.remat == "none":
        out.append("remat='none' keeps every layer's activations: fewest FLOPs, most memory (see the peak)")
    return out


def format_report(r: dict) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    lines = [f"{r['model']} on {r['topology']} ({r['libtpu_topology']} x{r['num_slices']} slice(s), "
             f"{r['chips']} chips, {r['device_kind']}), mesh {r['mesh']}",
             f"  batch {r['global_batch']} x {r['seq_len']} = {r['tokens_per_step']:,} tokens/step, "
             f"micro_batches {r['micro_batches']}, attention {r['attention_impl']}"
             f"{' (fused backward)' if r.get('splash_fused_bwd') and r['attention_impl'] == 'splash' else ''}"
             f"{' = ' + r['attention_impl_config'] if r.get('attention_impl_config') == 'auto' else ''}, "
             f"remat {r['remat']}, loss chunk {r.get('loss_chunk')}",
             f"  step program {r.get('step_program')} (launch/train.py prints the same fingerprint for this "
             f"config on these devices)",
             *[f"  NOTE: {n}" for n in r.get("notes", [])],
             f"  per chip: peak {g(r['bytes_per_chip_peak'])} of {g(r['hbm_bytes_per_chip'])} HBM -> "
             f"{'FITS' if r['fits'] else 'DOES NOT FIT'}  ({r.get('peak_source', 'xla peak_memory_in_bytes')}: "
             f"heap-simulated, arguments included)",
             f"            = arguments {g(r['bytes_per_chip_arguments'])} + output - alias "
             f"{g(r['bytes_per_chip_output'] - r['bytes_per_chip_alias'])} + temporaries at the peak "
             f"{g(r.get('bytes_per_chip_temp_at_peak', 0))}",
             f"            (XLA temp_size_in_bytes {g(r['bytes_per_chip_temp'])}: counts the layer scan's stacked "
             f"buffers twice on TPU, not a requirement)",
             f"  FLOPs per chip: compiled {r['flops_per_chip']:.3e}, model {r['model_flops_per_chip']:.3e} "
             f"(ratio {r['flops_ratio_compiled_to_model']:.2f}; full remat adds one forward: ~1.33)",
             *([f"    matmuls {r['flops_ratio_matmul']:.2f}x the model's, attention kernels "
                f"{r['flops_ratio_attention']:.2f}x ({r['model_attention_share']:.0%} of the model's count; "
                f"splash: forward 4 + remat forward 4 unless the policy keeps 'context' + "
                f"{'fused dK,dV,dQ 10' if r.get('splash_fused_bwd') else 'dK,dV 8 + dQ 6'} "
                f"vs 3 x 4 per causal T·S·H)"]
               if "flops_ratio_attention" in r else []),
             *([f"    8-bit ({r['quantization']}) matmuls: {r.get('eight_bit_flops_share', 0):.0%} of the compiled "
                f"matmul FLOPs (dots with both operands 8-bit in the HLO; step time below at the 8-bit rate)"]
               if r.get("quantization") else []),
             "    counted from the HLO: " + ", ".join(f"{k} {v:.2e}" for k, v in
                                                 r.get("flops_breakdown_per_chip", {}).items() if k != "total")]
    if r.get("rollout"):
        ro = r["rollout"]
        lines.append(f"  on-policy rollout ({ro['prompt_len']} prompt + {ro['completion_len']} sampled tokens): peak "
                     f"{g(ro['bytes_per_chip_peak'])} -> {'FITS' if ro['fits'] else 'DOES NOT FIT'} (a separate program: "
                     f"the step's peak does not add to it)")
    lines.append("  MEASURED (read from the compiled program: XLA's memory analysis, our count of its HLO): the "
                 "memory and FLOPs above, the collectives below"
                 + (f", HBM traffic {r['hbm_traffic_bytes_per_chip'] / GIB:,.1f} GiB and host offload "
                    f"{(r.get('host_offload_bytes_per_chip') or 0) / GIB:,.1f} GiB per chip per step"
                    if r.get("hbm_traffic_bytes_per_chip") is not None else ""))
    if r.get("step_time"):
        lines.append("  MODELLED " + step_time.summary_line(r["step_time"]))
    for note in r["sharding_fallbacks"]:
        lines.append(f"  fallback (replicated): {note}")
    lines.append("  collectives per step (count, bytes per chip = output sizes, wire = sent per chip by a ring):")
    for k, v in r["collectives"].items():
        extra = f"  (expected rows: {v['bytes_expected'] / GIB:.2f} GiB)" if "bytes_expected" in v else ""
        wire = f"  wire {v['wire_bytes'] / GIB:8.2f} GiB" if "wire_bytes" in v else ""
        lines.append(f"    {k:<20} {v['count']:8.0f}  {v['bytes'] / GIB:10.2f} GiB{wire}{extra}")
        for role, what in (("as_all_gather", "all-gathers done as all-reduces of a shard-padded buffer"),
                           ("as_reduce_scatter", "reduce-scatters left as all-reduce + dynamic-slice")):
            if role in v and v[role]["bytes"] >= 0.01 * v["bytes"]:
                lines.append(f"      {role.replace('_', ' '):<18} {v[role]['count']:8.0f}  "
                             f"{v[role]['bytes'] / GIB:10.2f} GiB  ({what})")
    return "\n".join(lines)


