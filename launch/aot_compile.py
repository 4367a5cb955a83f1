"""Compile the real train step for a TPU slice on a CPU box: does it fit, FLOPs, collectives.

  python launch/aot_compile.py --preset qwen3-235b-a22b --topology v5p-1024 --seq_len 4096 \
      --global_batch 1024 --mesh fsdp=64,expert=8 [--num_slices N] [--report out.json]
  python launch/aot_compile.py --gin stage1.gin --topology v5p-1024 [--gin_param K=V ...]

Nothing is allocated: parameters, optimizer state and batch are `ShapeDtypeStruct`s sharded over
the devices of libtpu's topology description (`jax.experimental.topologies`), and XLA:TPU
compiles the step exactly as it would on the slice. Prints per-chip memory (arguments,
temporaries, output, peak) against the chip's HBM, FLOPs per chip vs the model's own count,
tokens per step and the collectives; exits 1 when the step does not fit.

Memory (`compiled.memory_analysis()`, XLA's CompiledMemoryStats; see MEMORY_FIELDS): `fits` compares
`peak_memory_in_bytes` with HBM. That is the heap-simulated peak over the compiled schedule,
arguments and outputs included. XLA:TPU refuses a program itself ("the total memory required for
HLO temporaries (X G) exceeds available HBM (95.74G)", G = GiB), and that check does not use
`temp_size_in_bytes`: the 8b step compiles for v5e-64 (15.75 GiB usable) with a peak of 14.75 GiB
although arguments + temp_size_in_bytes come to 19.6 GiB. `temp_size_in_bytes` is not a
liveness-aware temporaries figure on TPU. On CPU and GPU it is the
size of the preallocated temp allocation, which the heap simulator packs (xla/pjrt
PopulateBufferStatsFromAllocations). libtpu reports more than that allocation: with the layer
scan it exceeds the temp allocation of the buffer-assignment dump by about the size of the scan's
stacked per-layer buffers. Measured: +128 MiB for 4 layers and +256 MiB for 8 layers of 32 MiB
residuals; +4.75 GiB for the 8b step, whose stacked residuals are 4.5 GiB.

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

import numpy as np

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
# report key -> meaning of the memory numbers (written into the JSON report)
MEMORY_FIELDS = {
    "bytes_per_chip_peak": "XLA peak_memory_in_bytes: heap-simulated peak of HBM over the compiled schedule, "
                           "arguments and outputs included; what XLA:TPU checks against HBM; `fits` uses it",
    "bytes_per_chip_arguments": "argument_size_in_bytes: train state + batch, resident for the whole step",
    "bytes_per_chip_output": "output_size_in_bytes: new train state + metrics",
    "bytes_per_chip_alias": "alias_size_in_bytes: outputs written into donated argument buffers (the state)",
    "bytes_per_chip_temp_at_peak": "peak - arguments - (output - alias): temporaries live at the peak",
    "bytes_per_chip_temp": "XLA temp_size_in_bytes as libtpu reports it: larger than the temp allocation "
                           "(it counts the layer scan's stacked buffers a second time), so arguments + temp "
                           "overstate what the step needs; not used for `fits`",
}
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
    return {"accelerator": name, "libtpu_name": f"{lib}:{shape}", "chips": chips, "hbm_bytes_per_chip": hbm,
            "wrap": torus_wrap(shape, is3d)}


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


def topology_devices(topo: dict, num_slices: int = 1):
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(topology_name=topo["libtpu_name"], platform="tpu", num_slices=num_slices,
                                        wrap=topo.get("wrap", (False, False, False)))
    return list(desc.devices)


def model_flops_per_token(cfg, seq_len: int) -> float:
    """The model's own count (`qwen3_jax.train.metrics.flops_per_token`: 6 × matmul params
    touched per token + causal attention), for one train step."""
    from qwen3_jax.train.metrics import flops_per_token

    return flops_per_token(cfg, seq_len)


def _trip_count(while_line: str, comps: dict, defs: dict) -> float:
    """Trip count of a scan's while loop: XLA's known_trip_count, else `bound - start` of the
    counter its condition compares (`counter < bound`), the start read from the loop's initial
    tuple: XLA peels a scan's first iteration out of the loop and starts the counter at 1."""
    t = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
    if t:
        return float(t.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_line)
    lines = comps.get(cond.group(1) if cond else "", [])
    for line in lines:
        m = re.search(r"compare\(%([\w.\-]+), %([\w.\-]+)\), direction=LT", line)
        counter = defs.get(m.group(1)) if m else None
        bound = _constant(m.group(2), defs) if m else None
        index = re.search(r"get-tuple-element\(.*index=(\d+)", counter[4]) if counter else None
        if bound is None or index is None:
            continue
        init = re.search(r"while\(%([\w.\-]+)\)", while_line)
        start = defs.get(init.group(1)) if init else None
        first = start[2][int(index.group(1))] if start and start[1] == "tuple" else None
        begin = _constant(first, defs) if first else None
        return float(max(bound - (begin or 0), 0))
    consts = [int(c) for line in lines for c in re.findall(r"s32\[\]\S*\s+constant\((\d+)\)", line)]
    return float(max(consts)) if consts else 1.0


def _constant(name: str, defs: dict) -> int | None:
    """The integer constant behind `name`, through copies and conversions; None if it is not one."""
    for _ in range(8):
        d = defs.get(name)
        if d is None:
            return None
        if d[1] == "constant":
            c = re.search(r"constant\((-?\d+)\)", d[4])
            return int(c.group(1)) if c else None
        if d[1] not in _PASS or not d[2]:
            return None
        name = d[2][0]
    return None


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
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
    return comps, entry


def _multipliers(comps: dict, entry: str, defs: dict | None = None) -> dict[str, float]:
    """How often each computation runs per step: while bodies × their trip counts, nested.
    `defs`: _instructions(comps)[0] when the caller has it already."""
    edges: dict[str, list[tuple[str, float]]] = defaultdict(list)
    defs = _instructions(comps)[0] if defs is None else defs
    for c, lines in comps.items():
        for line in lines:
            callees = re.findall(r"(?:body|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)", line)
            for group in re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", line):
                callees += re.findall(r"%?([\w.\-]+)", group)
            trip = _trip_count(line, comps, defs) if " while(" in line else 1.0
            for callee in callees:
                if callee in comps and callee != c:
                    edges[c].append((callee, trip))
    indeg: dict[str, int] = defaultdict(int)
    seen, stack = {entry}, [entry]
    while stack:  # the computations reachable from the entry, and their callers' count
        for callee, _ in edges[stack.pop()]:
            indeg[callee] += 1
            if callee not in seen:
                seen.add(callee)
                stack.append(callee)
    mult = defaultdict(float, {entry: 1.0})
    ready = [entry]
    while ready:  # topological order: a computation's count is final before it is propagated
        c = ready.pop()
        for callee, trip in edges[c]:
            mult[callee] += mult[c] * trip
            indeg[callee] -= 1
            if indeg[callee] == 0:
                ready.append(callee)
    return mult


def _nbytes(type_text: str) -> int:
    return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", type_text))


def _group_size(line: str, num_partitions: int) -> int:
    """Devices per replica group of a collective: `mesh['a'=8,'b'=8] {'b'}`, `{{0,1,..},..}`,
    `[groups,size]<=[..]`, or `{}` (all partitions)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)) if a in sizes)
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    return num_partitions


def _instructions(comps: dict) -> tuple[dict, dict, dict]:
    """name -> (computation, op, operand names, called computations, line); name -> users;
    computation -> its ROOT instruction's name."""
    defs, users, roots = {}, defaultdict(list), {}
    for c, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            name, _, op, rest = m.groups()
            operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            called = re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest)
            defs[name] = (c, op, operands, called, line)
            if line.lstrip().startswith("ROOT"):
                roots[c] = name
            for o in operands:
                users[o].append(name)
    return defs, users, roots


_PASS = ("bitcast", "copy", "get-tuple-element", "reshape", "convert")


def _is_padded_gather(name: str, defs: dict, roots: dict, depth: int = 0) -> bool:
    """The value is a dynamic-update-slice (one shard written into a buffer): an all-reduce of it
    is an all-gather done as an all-reduce (libtpu's all-gather decomposer)."""
    d = defs.get(name)
    if d is None or depth > 6:
        return False
    _, op, operands, called, _ = d
    if op == "dynamic-update-slice":
        return True
    if op in _PASS and operands:
        return _is_padded_gather(operands[0], defs, roots, depth + 1)
    if op == "fusion" and called:
        return _is_padded_gather(roots.get(called[0], ""), defs, roots, depth + 1)
    return False


def _only_sliced(name: str, defs: dict, users: dict, depth: int = 0) -> bool:
    """Every use of the value reads a dynamic-slice of it: an all-reduce of it is a reduce-scatter
    done as an all-reduce (each device keeps its shard of the sum)."""
    us = users.get(name, [])
    if not us or depth > 6:
        return False
    for u in us:
        _, op, operands, called, _ = defs[u]
        if op == "dynamic-slice" and operands and operands[0] == name:
            continue
        if op in _PASS and _only_sliced(u, defs, users, depth + 1):
            continue
        if op == "fusion" and called:
            params = {int(m.group(2)): m.group(1) for n2, d2 in defs.items() if d2[0] == called[0]
                      for m in [re.match(r".*?%([\w.\-]+)\s*=.*\sparameter\((\d+)\)", d2[4])] if m}
            idx = [i for i, o in enumerate(operands) if o == name]
            if idx and all(i in params and _only_sliced(params[i], defs, users, depth + 1) for i in idx):
                continue
        return False
    return True


def collective_summary(hlo_text: str, ragged_rows: float | None = None) -> dict:
    """Per collective kind: instructions executed per step, bytes (output sizes) and wire bytes
    per device, with ops inside while loops (the layer scan, micro-batches) multiplied by the trip
    count.

    wire_bytes: what one device sends with ring algorithms over its replica group of n devices:
    all-gather and all-to-all (n-1)/n x output, reduce-scatter (n-1) x output, all-reduce
    2(n-1)/n x output, collective-permute the output.

    all-reduce also reports `as_all_gather` and `as_reduce_scatter`: on a slice described without
    wraparound links (see `torus_wrap`) libtpu lowers FSDP's all-gathers over the whole slice as an
    all-reduce of a buffer that holds the device's shard and zeros elsewhere; on tori as on open
    meshes it leaves the gradient's all-reduce + dynamic-slice as it is instead of forming a
    reduce-scatter. Their bytes are the full tensors, as an all-gather's output. An all-reduce of
    such a buffer moves 2x an all-gather's wire bytes.

    ragged-all-to-all outputs are worst-case buffers (dropless: every token of the expert group
    could pick this device); `bytes_expected` counts `ragged_rows` rows of them instead."""
    comps, entry = _computations(hlo_text)
    if entry is None:
        return {}
    defs, users, roots = _instructions(comps)
    mult = _multipliers(comps, entry, defs)
    parts = re.search(r"num_partitions=(\d+)", hlo_text)
    num_partitions = int(parts.group(1)) if parts else 1
    out = {k: {"count": 0, "bytes": 0.0, "wire_bytes": 0.0} for k in COLLECTIVES}
    for c, lines in comps.items():
        if not mult.get(c):
            continue
        for line in lines:
            m = re.search(r"%([\w.\-]+)\s*=\s*(.+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
                          r"ragged-all-to-all|collective-permute)(-start)?\(", line)
            if not m:
                continue
            name, typ, op, start = m.groups()
            if start and typ.startswith("("):
                typ = _async_output(typ)
            nbytes = _nbytes(typ)
            n = max(_group_size(line, num_partitions), 1)
            wire = {"all-gather": (n - 1) / n, "all-to-all": (n - 1) / n, "ragged-all-to-all": (n - 1) / n,
                    "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}[op]
            kind = out[op]
            kind["count"] += mult[c]
            kind["bytes"] += mult[c] * nbytes
            kind["wire_bytes"] += mult[c] * nbytes * wire
            if op == "ragged-all-to-all" and ragged_rows:
                rows = _shapes(typ)[0][1][0]
                kind["bytes_expected"] = kind.get("bytes_expected", 0.0) + \
                    mult[c] * nbytes * min(1.0, ragged_rows / rows)
            if op == "all-reduce":
                operands = defs[name][2] if name in defs else []
                role = ("as_all_gather" if operands and all(_is_padded_gather(o, defs, roots) for o in operands)
                        else "as_reduce_scatter" if _only_sliced(name, defs, users) else None)
                if role:
                    sub = kind.setdefault(role, {"count": 0, "bytes": 0.0})
                    sub["count"] += mult[c]
                    sub["bytes"] += mult[c] * nbytes
    return {k: v for k, v in out.items() if v["count"]}


# -- FLOPs from the compiled HLO ---------------------------------------------------------------------

def _tuple_elements(type_text: str) -> list[str]:
    """The top-level elements of a tuple type `(a, (b, c), d)`: ['a', '(b, c)', 'd']."""
    inner = type_text.strip()[1:-1]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        depth += ch in "({["
        depth -= ch in ")}]"
        if ch == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    parts.append(inner[start:].strip())
    return [re.sub(r"^/\*index=\d+\*/", "", p) for p in parts if p]


def _async_output(type_text: str) -> str:
    """The output of an async collective's `-start` from its tuple type: element 1 of
    (operand(s), output(s), context...), e.g. all-gather-start `(bf16[a], bf16[b])`,
    ragged-all-to-all-start `((input, output, 4 x s32 offsets), bf16[out], u32[], u32[])`."""
    parts = _tuple_elements(type_text)
    return parts[1] if len(parts) > 1 else type_text


def _shapes(type_text: str) -> list[tuple[str, list[int]]]:
    return [(dt, [int(d) for d in dims.split(",") if d]) for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", type_text)]


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")


def _conv_macs(line: str, out_dims: list[int], lhs_dims: list[int], rhs_dims: list[int]) -> float:
    """Multiply-adds of an XLA convolution, counting only window taps that land on real (not
    padding or dilation-hole) input: XLA:TPU writes batched matmuls as convolutions whose
    windows slide over a padded batch dimension with one valid tap per output."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line)
    if not labels:
        return 2.0 * math.prod(out_dims)
    lhs_l, rhs_l, out_l = labels.groups()
    win = re.search(r"window=\{([^}]*)\}", line)
    attrs = dict(kv.split("=") for kv in win.group(1).split()) if win else {}
    nsp = sum(ch.isdigit() for ch in out_l)
    field = lambda k, d: [int(x) for x in attrs[k].split("x")] if k in attrs else [d] * nsp  # noqa: E731
    size, stride = field("size", 1), field("stride", 1)
    lhs_dil, rhs_dil = field("lhs_dilate", 1), field("rhs_dilate", 1)
    pads = [tuple(int(x) for x in p.split("_")) for p in attrs["pad"].split("x")] if "pad" in attrs \
        else [(0, 0)] * nsp
    taps = 1.0
    for d in range(nsp):
        i_size = lhs_dims[lhs_l.index(str(d))]
        o_size = out_dims[out_l.index(str(d))]
        dilated = (i_size - 1) * lhs_dil[d] + 1
        o = np.arange(o_size)
        valid = 0
        for t in range(size[d]):
            pos = o * stride[d] + t * rhs_dil[d] - pads[d][0]
            valid += int(np.count_nonzero((pos >= 0) & (pos < dilated) & (pos % lhs_dil[d] == 0)))
        taps *= valid
    non_spatial = math.prod(n for n, ch in zip(out_dims, out_l) if not ch.isdigit())
    return non_spatial * rhs_dims[rhs_l.index("i")] * taps


# splash kernels: matmul FLOPs per (q row, k row, head dim) with a causal mask's half of the blocks
_SPLASH_FLOPS = {"fwd": 4.0, "dkv": 8.0, "dq": 6.0, "bwd": 10.0}


def hlo_flops(hlo_text: str, ragged_rows: float | None = None, causal: bool = True) -> dict:
    """Matmul FLOPs per device of one step from the compiled HLO text.

    dot and convolution: 2·(output elements)·(contracted size) (convolutions: real window taps
    only). Each computation counts × the trip counts of the while loops around it (the layer
    scan, micro-batches), which XLA's cost_analysis counts once. Kernels (custom calls) that
    cost_analysis does not see: ragged_dot / megablox gmm and tgmm count 2·rows·K·N with
    `ragged_rows` rows (the assignments this device really receives) instead of their buffer's
    worst case; splash attention 4 (forward), 8 (dK,dV), 6 (dQ) or 10 (fused dK,dV,dQ) ·B·N·T·S·H,
    halved when causal (the two-kernel backward recomputes the scores twice: 1.83x the model's
    attention count with full remat; the fused one once: 1.5x).
    Elementwise work (norms, softmax, SwiGLU gating) is not counted: it is < 1% here.
    """
    comps, entry = _computations(hlo_text)
    if entry is None:
        return {}
    mult = _multipliers(comps, entry)
    shapes: dict[str, list[int]] = {}
    parsed = []
    for c, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if m:
                name, typ, op, rest = m.groups()
                sh = _shapes(typ)
                if len(sh) == 1:
                    shapes[name] = sh[0][1]
                if mult.get(c) and op in ("dot", "convolution", "custom-call"):
                    parsed.append((c, name, typ, op, rest))
    out = defaultdict(float)
    for c, name, typ, op, rest in parsed:
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        odims = _shapes(typ)[0][1] if _shapes(typ) else []
        if op == "dot":
            lhs = shapes.get(operands[0], [])
            cdims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
            contracted = math.prod(lhs[int(i)] for i in cdims.group(1).split(",") if i) if cdims and lhs else 1
            out["dot"] += mult[c] * 2.0 * math.prod(odims) * contracted
        elif op == "convolution":
            lhs, rhs = shapes.get(operands[0]), shapes.get(operands[1])
            if lhs is None or rhs is None:
                continue
            out["convolution"] += mult[c] * 2.0 * _conv_macs(rest, odims, lhs, rhs)
        else:
            meta = re.search(r'op_name="([^"]*)"', rest)
            tag = name + " " + (meta.group(1) if meta else "")
            cons = _shapes(re.search(r"operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\}", rest).group(1)) \
                if "operand_layout_constraints" in rest else []
            if "splash" in tag:
                kind = next((k for k in ("fwd", "dkv", "dq", "bwd") if f"_{k}" in name), None)
                qk = [d for dt, d in cons if len(d) >= 3 and dt in ("bf16", "f32", "f16")]
                if kind == "dkv" and any(len(d) == len(qk[0]) + 1 and d[-3:] == qk[0][-3:]
                                         for _, d in _shapes(typ) if qk):
                    kind = "bwd"  # the fused backward: dK, dV and per-kv-block dQ copies [(B,) n, N, T, H]
                if kind and len(qk) >= 2:  # q [(B,) N, T, H], k [(B,) K, S, H]
                    T, H = qk[0][-2:]
                    S = qk[1][-2]
                    out["attention_kernel"] += mult[c] * _SPLASH_FLOPS[kind] * math.prod(qk[0][:-2]) * T * S * H \
                        * (0.5 if causal else 1.0)
            elif re.search(r"ragged.dot|gmm", tag) and "metadata" not in tag:
                mats = [d for dt, d in cons if len(d) in (2, 3) and dt in ("bf16", "f32", "f16")]
                two = [d for d in mats if len(d) == 2]
                three = [d for d in mats if len(d) == 3]
                if len(odims) == 2 and two and three:  # [M,K] x [G,K,N] -> [M,N]
                    M, K = two[0]
                    N = odims[1]
                elif len(odims) == 3 and len(two) >= 2:  # [K,M] x [M,N] -> [G,K,N] (weight gradient)
                    G, K, N = odims
                    M = next((d[0] for d in two if d[1] == N and d[0] != K), max(two[0]))
                else:
                    continue
                rows = min(M, ragged_rows) if ragged_rows else M
                out["grouped_matmul"] += mult[c] * 2.0 * rows * K * N
                out["grouped_matmul_buffer"] += mult[c] * 2.0 * M * K * N
    res = dict(out)
    res["total"] = sum(v for k, v in out.items() if k != "grouped_matmul_buffer")
    return res


def _flops_split(cfg, seq_len: int, tokens_per_device: float, counted: dict) -> dict:
    """Compiled vs model FLOPs for the attention kernels and for the rest (matmuls), when the
    attention ran as a kernel (splash) whose FLOPs the HLO count can tell apart. The model's
    attention share is its count at seq_len minus its count at length 0 (matmuls only)."""
    if not counted.get("attention_kernel"):
        return {}
    matmul = model_flops_per_token(cfg, 0) * tokens_per_device
    attention = model_flops_per_token(cfg, seq_len) * tokens_per_device - matmul
    return {"flops_ratio_matmul": (counted["total"] - counted["attention_kernel"]) / matmul,
            "flops_ratio_attention": counted["attention_kernel"] / attention,
            "model_attention_share": attention / (attention + matmul)}


def aot_compile(cfg, mesh_cfg, seq_len: int, global_batch: int, micro_batches: int, topology: str,
                num_slices: int = 1, *, aux_scope: str = "global", moe_exchange: str = "auto",
                capacity_factor: float | None = None, z_loss: float = 0.0, hlo_dump: str | None = None,
                hbm_bytes_per_chip: int | None = None, loss_chunk: int | None = 2048) -> dict:
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
    step = make_train_step(cfg, optimizer, micro_batches=micro_batches, aux_scope=aux_scope, z_loss=z_loss,
                           loss_chunk=loss_chunk)
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
                    "flops_per_chip": None, "bytes_per_chip_peak": float(need.group(1)) * GIB if need else None,
                    "peak_source": "XLA:TPU's RESOURCE_EXHAUSTED message (HLO temporaries, GiB)",
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
    live_io = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    peak_source = "xla peak_memory_in_bytes"
    if not peak:  # a jaxlib without the field: arguments + outputs + temp, an upper bound (see MEMORY_FIELDS)
        peak, peak_source = live_io + mem.temp_size_in_bytes, "upper bound: arguments + output - alias + temp"
    tokens = global_batch * seq_len
    model_flops = model_flops_per_token(cfg, seq_len) * tokens / len(devices)
    ragged_rows = None
    if cfg.num_experts and mesh.shape.get("expert", 1) > 1:  # rows one device's experts get per micro-batch
        ragged_rows = tokens * cfg.num_experts_per_tok / (sharding.batch_shards(mesh) * micro_batches)
    counted = hlo_flops(text, ragged_rows=ragged_rows, causal=True)
    flops = counted.get("total", 0.0)
    return {
        "model": cfg.name, "topology": topology, "libtpu_topology": topo["libtpu_name"], "num_slices": num_slices,
        "chips": chips, "devices": len(devices), "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape), "seq_len": seq_len, "global_batch": global_batch, "micro_batches": micro_batches,
        "tokens_per_step": tokens, "attention_impl": cfg.attention_impl,
        "splash_fused_bwd": cfg.splash_fused_bwd, "remat": cfg.remat,
        "moe_exchange": moe_exchange, "capacity_factor": capacity_factor,
        "flops_per_chip": flops * per_chip, "model_flops_per_chip": model_flops * per_chip,
        "flops_ratio_compiled_to_model": flops / model_flops if model_flops else None,
        **_flops_split(cfg, seq_len, tokens / len(devices), counted),
        "flops_breakdown_per_chip": {k: v * per_chip for k, v in counted.items()},
        "xla_cost_analysis_flops_per_chip": float(cost.get("flops", 0.0)) * per_chip,
        "expected_expert_rows_per_device": ragged_rows,
        "bytes_per_chip_arguments": mem.argument_size_in_bytes * per_chip,
        "bytes_per_chip_output": mem.output_size_in_bytes * per_chip,
        "bytes_per_chip_alias": mem.alias_size_in_bytes * per_chip,
        "bytes_per_chip_temp": mem.temp_size_in_bytes * per_chip,
        "bytes_per_chip_temp_at_peak": max(peak - live_io, 0) * per_chip,
        "bytes_per_chip_peak": peak * per_chip, "peak_source": peak_source, "hbm_bytes_per_chip": hbm * per_chip,
        "fits": peak <= hbm, "memory_fields": MEMORY_FIELDS, "sharding_fallbacks": fallbacks,
        "collectives": collective_summary(text, ragged_rows),
    }


def format_report(r: dict) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    lines = [f"{r['model']} on {r['topology']} ({r['libtpu_topology']} x{r['num_slices']} slice(s), "
             f"{r['chips']} chips, {r['device_kind']}), mesh {r['mesh']}",
             f"  batch {r['global_batch']} x {r['seq_len']} = {r['tokens_per_step']:,} tokens/step, "
             f"micro_batches {r['micro_batches']}, attention {r['attention_impl']}"
             f"{' (fused backward)' if r.get('splash_fused_bwd') and r['attention_impl'] == 'splash' else ''}, "
             f"remat {r['remat']}",
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
                f"splash: forward 4 + remat forward 4 + "
                f"{'fused dK,dV,dQ 10 = 18' if r.get('splash_fused_bwd') else 'dK,dV 8 + dQ 6 = 22'} "
                f"vs 3 x 4 per causal T·S·H)"]
               if "flops_ratio_attention" in r else []),
             "    counted from the HLO: " + ", ".join(f"{k} {v:.2e}" for k, v in
                                                 r.get("flops_breakdown_per_chip", {}).items() if k != "total")]
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
    p.add_argument("--splash_fused_bwd", default=None, choices=["true", "false"],
                   help="splash's one-kernel backward (ModelConfig.splash_fused_bwd; default: the gin/preset's)")
    p.add_argument("--moe_exchange", default=None, help="auto (default) | ragged | gather")
    p.add_argument("--capacity_factor", type=float, default=None, help="default: dropless")
    p.add_argument("--aux_scope", default=None, help="global (default) | micro_batch")
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
    if args.splash_fused_bwd is not None:
        overrides["splash_fused_bwd"] = args.splash_fused_bwd == "true"
    if "attention_impl" not in overrides and cfg.attention_impl == "reference":
        overrides["attention_impl"] = "splash"  # the TPU kernel; reference attention is O(T^2) memory
    cfg = cfg.replace(**overrides)
    mesh_cfg = _parse_mesh(args.mesh) if args.mesh else settings.get("mesh_cfg") or _parse_mesh("")
    seq_len = args.seq_len or settings.get("seq_len")
    batch = args.global_batch or settings.get("global_batch")
    micro = args.micro_batches or settings.get("micro_batches") or 1
    if not seq_len or not batch:
        p.error("--seq_len and --global_batch are needed (or a gin file that sets them)")
    pick = lambda k, d: getattr(args, k) if getattr(args, k) is not None else settings.get(k, d)  # noqa: E731
    report = aot_compile(cfg, mesh_cfg, seq_len, batch, micro, args.topology, args.num_slices,
                         aux_scope=pick("aux_scope", "global"), moe_exchange=pick("moe_exchange", "auto"),
                         capacity_factor=pick("capacity_factor", None), z_loss=settings.get("z_loss", 0.0),
                         hlo_dump=args.hlo_dump, loss_chunk=settings.get("loss_chunk", 2048),
                         hbm_bytes_per_chip=int(args.hbm_gib * GIB) if args.hbm_gib else None)
    print(format_report(report) if "error" not in report else
          f"{report['model']} on {report['topology']}, mesh {report['mesh']}: DOES NOT FIT\n  {report['error']}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["fits"] else 1


def gin_settings(files, bindings) -> dict:
    """What the training gin files say: the model (as `train` builds it, for TPU), SEQ_LEN,
    BATCH_SIZE, micro-batches, the mesh (`train.mesh = @MeshConfig()`), the MoE exchange and
    capacity, aux scope and z-loss. Parsed by launch/train.py's own `parse_gin`."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gin
    from train import parse_gin  # launch/train.py

    from qwen3_jax.train.loop import model_config

    parse_gin(files, bindings)

    def query(name, default=None):
        try:
            return gin.query_parameter(name)
        except ValueError:
            return default

    out = {"cfg": model_config(backend="tpu"), "seq_len": query("%SEQ_LEN"), "global_batch": query("%BATCH_SIZE")}
    for key in ("micro_batches", "moe_exchange", "capacity_factor", "aux_scope", "z_loss", "loss_chunk"):
        v = query(f"train.{key}")
        if v is not None:
            out[key] = v
    ref = query("train.mesh")
    if ref is not None:
        out["mesh_cfg"] = ref.scoped_configurable_fn() if hasattr(ref, "scoped_configurable_fn") else ref
    return out


if __name__ == "__main__":
    sys.exit(main())
