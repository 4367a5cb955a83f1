"""Statistics of a compiled XLA program, read from its HLO text (`compiled.as_text()`).

Per step, with ops inside while loops (the layer scan, micro-batches) multiplied by the loops'
trip counts (which XLA's cost_analysis counts once):
- `collective_summary`: per collective kind, instructions executed, bytes (output sizes) and
  wire bytes per device (ring algorithms over the replica group), async `-start`s read by their
  output; all-reduces that are all-gathers / reduce-scatters in disguise named as such.
- `hlo_flops`: matmul FLOPs per device (dot, convolution with real window taps only) plus the
  kernels (custom calls) cost_analysis does not see: splash attention, ragged_dot / megablox gmm.
  `eight_bit` of them: the matmuls whose two operands are 8-bit (int8 / fp8: 8-bit training).

Pure functions of the HLO text: this module imports no jax (the `qwen3_jax` package's __init__
does). Used by launch/aot_compile.py and benchmarks/bench_aot_maxtext.py on compiled TPU programs.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict

import numpy as np

from qwen3_jax.model.moe_compute import OVERFLOW_SCOPE

EIGHT_BIT = ("s8", "u8", "f8e4m3fn", "f8e5m2", "f8e4m3", "f8e4m3fnuz", "f8e5m2fnuz")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


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
        step = _counter_step(while_line, comps, defs, int(index.group(1)))
        return float(max(math.ceil((bound - (begin or 0)) / step), 0))
    consts = [int(c) for line in lines for c in re.findall(r"s32\[\]\S*\s+constant\((\d+)\)", line)]
    return float(max(consts)) if consts else 1.0


def _counter_step(while_line: str, comps: dict, defs: dict, index: int) -> int:
    """How much the loop body adds to its counter (tuple element `index`) per trip: 1 for a
    scan; 2 for XLA:TPU's bidirectional windowed einsums (an all-gather or reduce-scatter
    overlapped with the matmul, two chunks per trip: `windowed_dot_general_body_*`)."""
    body = re.search(r"body=%?([\w.\-]+)", while_line)
    for line in comps.get(body.group(1) if body else "", []):
        m = _INSTR.match(line) if line.lstrip().startswith("ROOT") else None
        if not m or m.group(3) != "tuple":
            continue
        operands = re.findall(r"%([\w.\-]+)", m.group(4).split(")", 1)[0])
        d = defs.get(operands[index]) if index < len(operands) else None
        if d is not None and d[1] == "add":
            steps = [c for c in (_constant(o, defs) for o in d[2]) if c]
            return steps[0] if len(steps) == 1 and steps[0] > 0 else 1
    return 1


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


def _eight_bit_inputs(op: str, operands: list[str], dtypes: dict, rest: str) -> bool:
    """Both matrices of a dot / convolution, or all of a kernel's (its operands of rank >= 2, read
    from its layout constraints: a grouped matmul's first operands are int32 metadata), 8-bit."""
    if op != "custom-call":
        return len(operands) >= 2 and all(dtypes.get(o) in EIGHT_BIT for o in operands[:2])
    m = re.search(r"operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\}", rest)
    mats = [dt for dt, d in _shapes(m.group(1)) if len(d) >= 2] if m else []
    return bool(mats) and all(dt in EIGHT_BIT for dt in mats)


def hlo_flops(hlo_text: str, ragged_rows: float | None = None, causal: bool = True) -> dict:
    """Matmul FLOPs per device of one step from the compiled HLO text.

    dot and convolution: 2·(output elements)·(contracted size) (convolutions: real window taps
    only). Each computation counts × the trip counts of the while loops around it (the layer
    scan, micro-batches), which XLA's cost_analysis counts once. Kernels (custom calls) that
    cost_analysis does not see: ragged_dot / megablox gmm and tgmm count 2·rows·K·N with
    `ragged_rows` rows (the assignments this device really receives) instead of their buffer's
    worst case, those over the rows past a buffer's saved part (moe_compute.OVERFLOW_SCOPE:
    rows there only when routing sends a device more than ModelConfig.moe_saved_rows x its
    share) none; splash attention 4 (forward), 8 (dK,dV), 6 (dQ) or 10 (fused dK,dV,dQ) ·B·N·T·S·H,
    halved when causal (the two-kernel backward recomputes the scores twice: 1.83x the model's
    attention count with full remat; the fused one once: 1.5x).
    Elementwise work (norms, softmax, SwiGLU gating) is not counted: it is < 1% here.
    `eight_bit`: the part of the total whose matmul operands are both 8-bit (not in the total twice).
    """
    comps, entry = _computations(hlo_text)
    if entry is None:
        return {}
    mult = _multipliers(comps, entry)
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    parsed = []
    for c, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if m:
                name, typ, op, rest = m.groups()
                sh = _shapes(typ)
                if len(sh) == 1:
                    shapes[name] = sh[0][1]
                    dtypes[name] = sh[0][0]
                if mult.get(c) and op in ("dot", "convolution", "custom-call"):
                    parsed.append((c, name, typ, op, rest))
    out = defaultdict(float)
    for c, name, typ, op, rest in parsed:
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        before = sum(out[k] for k in ("dot", "convolution", "grouped_matmul"))
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
                mats = [d for dt, d in cons if len(d) in (2, 3) and dt in ("bf16", "f32", "f16", *EIGHT_BIT)]
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
                if ragged_rows and OVERFLOW_SCOPE in tag:  # past the saved rows: none expected
                    rows = 0
                out["grouped_matmul"] += mult[c] * 2.0 * rows * K * N
                out["grouped_matmul_buffer"] += mult[c] * 2.0 * M * K * N
        if _eight_bit_inputs(op, operands, dtypes, rest):
            out["eight_bit"] += sum(out[k] for k in ("dot", "convolution", "grouped_matmul")) - before
    res = dict(out)
    res["total"] = sum(v for k, v in out.items() if k not in ("grouped_matmul_buffer", "eight_bit"))
    return res


def program_fingerprint(lowered) -> str:
    """A short hash of the lowered step (StableHLO text): equal for the loop and the AOT tool
    when they build the same program for the same devices."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()[:16]
