"""An estimate of the train step's time on a TPU slice from its compiled program (no TPU needed).

Inputs, per chip and step: the FLOPs counted from the compiled HLO (`hlo_stats.hlo_flops`), the
HBM bytes its top-level ops read and write (`hbm_bytes`, loop trip counts included: XLA's
`cost_analysis()['bytes accessed']` counts a while body once), the wire bytes of its collectives
(`hlo_stats.collective_summary`; ragged all-to-alls at the rows expected, not the dropless
buffer), bytes offloaded to host memory by the remat policy, and the chip's published figures:

  compute   flops / bf16 peak                    HBM      bytes / HBM bandwidth
  ICI       wire bytes / (bidirectional ICI per chip / 2: what a chip can send)
  DCN       across slices: the gradient all-reduce of data parallelism, / DCN per chip
  host      offloaded bytes x 2 (out and back) / host link per chip (PCIe; an assumption)

`lower_bound_s` = the largest of them (perfect overlap, every unit at its peak). `estimate_s`:
compute and HBM traffic do not overlap with each other beyond the larger of the two, and the
transfers (ICI, DCN, host) hide behind `OVERLAP` of that time, the rest is exposed:
    core = max(compute, HBM);  estimate = core + max(0, ICI + DCN + host - OVERLAP * core)
Predicted MFU = model FLOPs / (estimate x peak). An estimate, not a measurement: no kernel
efficiency, no latency of small collectives, no pipeline bubbles; `check` in the report compares
it with one published MaxText figure (benchmarks/bench_aot.py --published).
"""

from __future__ import annotations

import dataclasses
import math
import re

from qwen3_jax import hlo_stats
from qwen3_jax.model.moe_compute import OVERFLOW_SCOPE

OVERLAP = 0.9  # share of the compute/HBM time collectives and host transfers can hide behind


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes_per_s: float
    ici_bidir_bytes_per_s: float  # bidirectional inter-chip interconnect per chip
    dcn_bytes_per_s: float  # data-center network per chip
    host_bytes_per_s: float  # host <-> chip (PCIe), one direction: assumed, not published
    host_ram_bytes: float | None  # host memory per chip (the VM's RAM / its chips)
    source: str


_PCIE = 32e9  # PCIe 4.0 x16, one direction: an assumption for every generation
CHIPS = {
    "v5p": Chip(459e12, 2765e9, 1200e9, 50e9 / 8, _PCIE, 448e9 / 4,
                "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM at 2,765 GB/s, "
                "bidirectional ICI 1,200 GB/s per chip, DCN 50 Gbps per chip, 448 GB RAM per 4-chip VM"),
    "v5e": Chip(197e12, 819e9, 2 * 1600e9 / 8, 2 * 100e9 / 8 / 8, _PCIE, 512 * 2**30 / 8,
                "cloud.google.com/tpu/docs/v6e (v5e column): 197 TFLOP/s bf16, 16 GB at 819 GB/s, "
                "ICI 1,600 Gbps (x2 for both directions), 2 x 100 Gbps NIC and 512 GiB per 8-chip host"),
    "v6e": Chip(918e12, 1640e9, 800e9, 4 * 200e9 / 8 / 8, _PCIE, 1536 * 2**30 / 8,
                "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB at 1,640 GB/s, bidirectional "
                "ICI 800 GB/s per chip, 4 x 200 Gbps NIC and 1,536 GiB per 8-chip host"),
    "v4": Chip(275e12, 1200e9, 2 * 2400e9 / 8, 50e9 / 8, _PCIE, None,
               "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB at 1,200 GB/s, ICI 2,400 Gbps "
               "(x2 for both directions); DCN assumed as v5p's 50 Gbps per chip"),
}
_GEN = {"v5litepod": "v5e", "v5lite": "v5e"}


def chip_for(libtpu_name: str) -> Chip | None:
    """The chip of a libtpu topology name ('v5p:8x8x8'); None for CPU hosts."""
    gen = libtpu_name.split(":")[0].split("-")[0].lower()
    return CHIPS.get(_GEN.get(gen, gen))


def estimate(chip: Chip, *, flops: float, model_flops: float, hbm_bytes: float, ici_wire_bytes: float,
             dcn_wire_bytes: float = 0.0, offload_bytes: float = 0.0) -> dict:
    """Seconds per step per term, the lower bound, the overlap estimate and the predicted MFU.
    All byte and FLOP figures are per chip and step."""
    t = {"compute_s": flops / chip.peak_flops,
         "hbm_s": hbm_bytes / chip.hbm_bytes_per_s,
         "ici_s": ici_wire_bytes / (chip.ici_bidir_bytes_per_s / 2),
         "dcn_s": dcn_wire_bytes / chip.dcn_bytes_per_s,
         "host_offload_s": 2 * offload_bytes / chip.host_bytes_per_s}
    core = max(t["compute_s"], t["hbm_s"])
    transfers = t["ici_s"] + t["dcn_s"] + t["host_offload_s"]
    t["lower_bound_s"] = max(t.values())
    t["estimate_s"] = core + max(0.0, transfers - OVERLAP * core)
    t["predicted_mfu"] = model_flops / (t["estimate_s"] * chip.peak_flops) if t["estimate_s"] else None
    t["predicted_mfu_upper"] = model_flops / (t["lower_bound_s"] * chip.peak_flops) if t["lower_bound_s"] else None
    return t


def ici_wire_bytes(collectives: dict) -> float:
    """Wire bytes per chip of `collective_summary`'s kinds; ragged all-to-alls at the expected rows."""
    total = 0.0
    for v in collectives.values():
        wire = v.get("wire_bytes", 0.0)
        if "bytes_expected" in v and v["bytes"]:
            wire *= v["bytes_expected"] / v["bytes"]
        total += wire
    return total


def dcn_wire_bytes(param_bytes: float, chips_per_slice: int, num_slices: int) -> float:
    """Data parallelism across slices: each chip all-reduces its (FSDP) shard of the fp32
    gradients with the other slices once per step: 2(S-1)/S of it on the wire."""
    if num_slices <= 1:
        return 0.0
    return 2 * (num_slices - 1) / num_slices * param_bytes / chips_per_slice


# -- HBM bytes from the compiled HLO ---------------------------------------------------------------

_GMM = re.compile(r'op_name="[^"]*(?:gmm|ragged_dot)')
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "copy-done",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done", "send-done",
         "recv-done", "ragged-all-to-all-done", "iota"}


def _operands(rest: str) -> list[str]:
    """Operand names of an instruction from the text after its opcode's '('."""
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", rest[:end])


def hbm_bytes(hlo_text: str, ragged_rows: float | None = None) -> float:
    """Bytes the step's top-level ops (fusions, kernels, copies, collectives) read and write per
    device, each × the trip counts of the loops around it. A fusion that updates a slice of a
    loop-carried buffer in place (dynamic-update-slice) counts the slice, and one that reads
    slices of a stacked buffer (dynamic-slice) counts the slices, as XLA's own cost model does.
    The ragged all-to-alls and grouped-matmul kernels (megablox) touch only the rows they
    receive: their dropless buffers count `ragged_rows` rows (as `hlo_stats.hlo_flops`); XLA's
    own ops on those buffers (elementwise, gathers) count in full, as they run."""
    comps, entry = hlo_stats._computations(hlo_text)
    if entry is None:
        return 0.0
    mult = hlo_stats._multipliers(comps, entry)
    size, lead, op_of, ops_in, fused = {}, {}, {}, {}, set()
    for c, lines in comps.items():
        for line in lines:
            m = hlo_stats._INSTR.match(line)
            if not m:
                continue
            name, typ, op, rest = m.groups()
            size[name] = hlo_stats._nbytes(typ)
            shapes = hlo_stats._shapes(typ)
            lead[name] = shapes[0][1][0] if len(shapes) == 1 and shapes[0][1] else 0
            op_of[name] = (c, op, _operands(rest), line)
            ops_in.setdefault(c, []).append(name)
            if op == "fusion" or "to_apply=" in rest:
                fused.update(re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest))
    total = 0.0
    for c, names in ops_in.items():
        if c in fused or not mult.get(c):
            continue
        for name in names:
            _, op, operands, line = op_of[name]
            if op in _FREE or op.endswith("-done"):
                continue
            nbytes = size[name] + sum(size.get(o, 0) for o in operands)
            if op in ("dynamic-update-slice-start", "dynamic-slice-start"):  # async, e.g. remat offload
                moved, host = _moved_slice(hlo_stats._INSTR.match(line).group(2))
                nbytes = moved if host else 2 * moved  # a host-memory side moves over PCIe, not HBM
            elif op == "dynamic-update-slice" and len(operands) > 1:
                nbytes = 2 * size.get(operands[1], 0)
            elif op == "dynamic-slice":
                nbytes = 2 * size[name]
            elif op == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", line)
                nbytes = _fusion_bytes(name, operands, comps.get(called.group(1), []) if called else [], size, comps)
            elif ragged_rows and op == "custom-call" and _GMM.search(line) and OVERFLOW_SCOPE in line:
                nbytes = 0.0  # grouped matmuls past a buffer's saved rows: no rows expected, no tiles run
            elif ragged_rows and (op == "ragged-all-to-all" or (op == "custom-call" and _GMM.search(line))):
                nbytes = sum(size.get(n, 0) * (min(1.0, ragged_rows / lead[n]) if lead.get(n) else 1.0)
                             for n in (name, *operands))
            total += mult[c] * nbytes
    return total


def _body(lines: list[str]) -> tuple[dict, dict, dict, str | None]:
    """A fused computation: name -> (op, operands, bytes, called), parameter index -> name,
    name -> users, ROOT name."""
    local, params, uses, root = {}, {}, {}, None
    for line in lines:
        m = hlo_stats._INSTR.match(line)
        if not m:
            continue
        n, typ, op, rest = m.groups()
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        local[n] = (op, _operands(rest), hlo_stats._nbytes(typ), called.group(1) if called else None)
        if op == "parameter":
            params[int(re.match(r"(\d+)", rest).group(1))] = n
        if line.lstrip().startswith("ROOT"):
            root = n
        for o in local[n][1]:
            uses.setdefault(o, []).append(n)
    return local, params, uses, root


def _sliced_read(p: str, body: tuple, comps: dict, depth: int = 0) -> int | None:
    """Bytes a fusion reads of its parameter `p` when every use is a dynamic-slice of it (also
    through nested fusions); None when some use reads it whole."""
    local, _, uses, _ = body
    users = uses.get(p, [])
    if not users or depth > 4:
        return None
    total = 0
    for u in users:
        op, operands, nbytes, called = local[u]
        if op == "dynamic-slice" and operands[0] == p:
            total += nbytes
        elif op == "fusion" and called in comps:
            inner = _body(comps[called])
            for i, o in enumerate(operands):
                if o == p:
                    read = _sliced_read(inner[1].get(i), inner, comps, depth + 1)
                    if read is None:
                        return None
                    total += read
        else:
            return None
    return total


def _fusion_bytes(name: str, operands: list[str], lines: list[str], size: dict, comps: dict) -> int:
    """A fusion's bytes: its output and operands, with in-place updated buffers counted by the
    update and sliced operands by the slices read."""
    body = _body(lines)
    local, params, _, root = body
    out = size.get(name, 0)
    in_place = set()
    roots = local[root][1] if root and local[root][0] == "tuple" else [root]
    for r in roots:
        if r in local and local[r][0] == "dynamic-update-slice":
            buf, upd = local[r][1][0], local[r][1][1]
            in_place.add(buf)
            out += local.get(upd, ("", [], 0, None))[2] - local[r][2]
    total = max(out, 0)
    for i, o in enumerate(operands):
        p = params.get(i)
        if p in in_place:
            continue
        read = _sliced_read(p, body, comps)
        total += size.get(o, 0) if read is None else read
    return total


def _moved_slice(type_text: str) -> tuple[int, bool]:
    """An async dynamic-(update-)slice's bytes moved (the slice: the second array of its
    ((operands), result, context) type) and whether its buffer is in host memory (S(5))."""
    arrays = [(dt, dims) for dt, dims in hlo_stats._shapes(type_text) if dims]
    dt, dims = arrays[1] if len(arrays) > 1 else arrays[0]
    return hlo_stats._DTYPE_BYTES.get(dt, 4) * math.prod(dims), "S(5)" in type_text


def offload_bytes(hlo_text: str) -> float:
    """Bytes per device the step copies from HBM to host memory (remat offload), × trip counts:
    outputs of ops placed in host memory space S(5), and the slices async dynamic-update-slices
    write into a host buffer (the layer scan's stacked offloaded residuals)."""
    comps, entry = hlo_stats._computations(hlo_text)
    if entry is None:
        return 0.0
    mult = hlo_stats._multipliers(comps, entry)
    total = 0.0
    for c, lines in comps.items():
        if not mult.get(c):
            continue
        for line in lines:
            m = hlo_stats._INSTR.match(line)
            if m and m.group(3) == "dynamic-update-slice-start" and "S(5)" in m.group(2):
                total += mult[c] * _moved_slice(m.group(2))[0]
            elif m and m.group(3) in ("copy-start", "copy", "dynamic-update-slice", "fusion") and "S(5)" in m.group(2):
                host = [t for t in re.findall(r"\w+\[[\d,]*\]\{[^}]*S\(5\)[^}]*\}", m.group(2))]
                total += mult[c] * sum(hlo_stats._nbytes(t) for t in host[:1])
    return total


def summary_line(t: dict) -> str:
    ms = lambda s: f"{s * 1e3:,.0f} ms"  # noqa: E731
    mfu = f"{t['predicted_mfu']:.0%}" if t.get("predicted_mfu") else "-"
    return (f"step time (estimate): {ms(t['estimate_s'])} (lower bound {ms(t['lower_bound_s'])}), predicted MFU "
            f"{mfu}; compute {ms(t['compute_s'])}, HBM {ms(t['hbm_s'])}, ICI {ms(t['ici_s'])}, DCN {ms(t['dcn_s'])}, "
            f"host offload {ms(t['host_offload_s'])}")

