"""The train step's time on a TPU slice or a GPU, from its compiled program (no accelerator needed).

What is read from the compiled program (XLA, per chip and step) is measured: the FLOPs counted
from the HLO (`hlo_stats.hlo_flops`), the HBM bytes its top-level ops read and write
(`hbm_bytes`, loop trip counts included: XLA's `cost_analysis()['bytes accessed']` counts a while
body once), the wire bytes of its collectives (`hlo_stats.collective_summary`; ragged all-to-alls
at the rows expected, not the dropless buffer) and the bytes the remat policy offloads to host
memory. Dividing them by the chip's published figures gives one time per unit:

  compute   flops / bf16 peak                    HBM      bytes / HBM bandwidth
  ICI       wire bytes / (bidirectional ICI per chip / 2: what a chip can send)
  DCN       across slices: the gradient all-reduce of data parallelism, / DCN per chip
  host      offloaded bytes x 2 (out and back) / host link per chip (PCIe; an assumption)

Everything from here on is modelled, not measured:
- `lower_bound_s` (`estimate`): the largest term, every unit at its peak and perfectly overlapped.
  A bound, not a prediction: it put qwen3-8b on v5p at 96% MFU.
- `estimate_s` (`estimate`, uncalibrated): compute and HBM do not overlap beyond the larger of the
  two, transfers hide behind `OVERLAP` of it: core = max(compute, HBM); core + max(0, ICI + DCN +
  host - OVERLAP * core). Kept for comparison ("before" in benchmarks/bench_step_time.py).
- the calibrated prediction (`calibrate`): the same formula with compute at a fitted fraction of
  the peak per chip family and HBM at a fitted fraction of its bandwidth (`CALIBRATION`), fitted
  (`fit`) on measured steps: our own runs on an H200 and MaxText's published MFU / tokens per
  second on v5p and v6e, each predicted from our compile of the same shapes (the points, their
  sources and the leave-one-out errors: benchmarks/aot_reports/step_time_calibration.json, printed
  by `python benchmarks/bench_step_time.py --from_json`). It is a range: the point times the
  smallest and largest measured / predicted ratio of the family's points (leave-one-out); where
  the points do not fix the HBM share (dense steps are compute-bound), the slow end also takes the
  lowest HBM share fitted anywhere. No end of it beats the best MFU any framework has published
  for the chip (`Calibration.cap_mfu`).
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
    # v7x (Ironwood): Google's published figures, not measured here; the AOT report counts per chip
    # (libtpu shows each chip as two devices, one per TensorCore, each with half the HBM). ICI and
    # DCN: not among the figures used; assumed as v5p's
    "v7x": Chip(2307e12, 7.37e12, 1200e9, 50e9 / 8, _PCIE, None,
                "cloud.google.com/tpu/docs/tpu7x: 2,307 TFLOP/s bf16 (4,614 fp8), 192 GB HBM at 7.37 TB/s "
                "(published, not measured); ICI and DCN assumed as v5p's"),
    # the GPU of our measured runs (benchmarks/gpu_reports/); its compiled program is the same step
    # compiled for TPU (no GPU on the AOT box): FLOPs and HBM bytes of that program, these figures
    "h200": Chip(989e12, 4.8e12, 900e9, 400e9 / 8, 64e9, 2e12 / 8,
                 "nvidia.com/en-us/data-center/h200: bf16 1,979 TFLOP/s with 2:4 sparsity = 989 dense, 141 GB "
                 "HBM3e at 4.8 TB/s, NVLink 900 GB/s; DGX H200: one 400 Gb/s NIC and 2 TB RAM per 8 GPUs, "
                 "PCIe Gen5 x16 (64 GB/s one way)"),
}
# Dense 8-bit matmul rates per chip (FLOP/s, an int8 "OP" = a FLOP) where the chip has a unit for
# the type; a type missing here runs at the bf16 rate (converted) and the AOT report says so.
EIGHT_BIT_FLOPS = {
    "v5p": {"int8": 918e12},  # cloud.google.com/tpu/docs/v5p: 918 TOPS int8; no fp8 unit
    "v5e": {"int8": 394e12},  # cloud.google.com/tpu/docs/v5e: 394 TOPS int8
    "v6e": {"int8": 1836e12},  # cloud.google.com/tpu/docs/v6e: 1,836 TOPS int8
    "v4": {},  # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16 or int8 (no faster int8)
    "v7x": {"fp8": 4614e12},  # cloud.google.com/tpu/docs/tpu7x: 4,614 TFLOP/s fp8 (published)
    "h200": {"int8": 1979e12, "fp8": 1979e12},  # nvidia H200 datasheet, dense (half the 2:4-sparse figure)
}


def eight_bit_rate(fam: str | None, quantization: str | None) -> float | None:
    """FLOP/s of `quantization`'s matmuls on chip family `fam`; None: no fast unit (bf16 rate)."""
    return EIGHT_BIT_FLOPS.get(fam or "", {}).get(quantization or "")


_GEN = {"v5litepod": "v5e", "v5lite": "v5e", "tpu v5 lite": "v5e", "tpu v6 lite": "v6e", "tpu v5": "v5p",
        "tpu v4": "v4", "nvidia h200": "h200", "tpu7x": "v7x"}


def family(name: str) -> str | None:
    """The chip family ('v5p', 'h200', ...) of a libtpu topology name ('v5p:8x8x8') or a device
    kind ('TPU v5', 'NVIDIA H200'); None for CPU hosts and unknown chips."""
    low = name.lower()
    for kind in sorted(_GEN, key=len, reverse=True):
        if " " in kind and low.startswith(kind):
            return _GEN[kind]
    gen = low.split(":")[0].split("-")[0]
    gen = _GEN.get(gen, gen)
    return gen if gen in CHIPS else None


def chip_for(name: str) -> Chip | None:
    """The chip of a libtpu topology name ('v5p:8x8x8') or device kind; None for CPU hosts."""
    fam = family(name)
    return CHIPS[fam] if fam else None


def estimate(chip: Chip, *, flops: float, model_flops: float, hbm_bytes: float, ici_wire_bytes: float,
             dcn_wire_bytes: float = 0.0, offload_bytes: float = 0.0, eight_bit_flops: float = 0.0,
             eight_bit_rate: float | None = None) -> dict:
    """Seconds per step per term, the lower bound, the overlap estimate and the predicted MFU.
    All byte and FLOP figures are per chip and step; `eight_bit_flops` of `flops` run at
    `eight_bit_rate` (None: at the bf16 peak)."""
    eight = eight_bit_flops / eight_bit_rate if eight_bit_rate else eight_bit_flops / chip.peak_flops
    t = {"compute_s": (flops - eight_bit_flops) / chip.peak_flops + eight,
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


# -- calibration: measured steps -> achieved shares of the peaks ----------------------------------

@dataclasses.dataclass(frozen=True)
class Calibration:
    """The fitted shares of one chip family and the range they carry (benchmarks/bench_step_time.py)."""

    compute: float  # achieved share of the bf16 peak on the compiled FLOPs
    hbm: float  # achieved share of the HBM bandwidth on the counted bytes
    hbm_fitted: bool  # False: the family's points do not determine it; taken = the compute share
    hbm_low: float  # the HBM share of the range's slow end: `hbm`, or where not fitted the lowest fitted one
    low: float  # the range: calibrated time x low .. x high (measured / predicted of the points,
    high: float  # leave-one-out, 1 included)
    points: tuple[str, ...]  # the measured points of this family the shares were fitted on
    loo_error: float | None  # the largest |leave-one-out error| among them (None: no points)
    cap_mfu: float  # the best MFU any framework has published on the chip: no prediction beats it
    cap_source: str


# The best published MFU per chip (each framework's own FLOP count; benchmarks/bench_step_time.py)
CAPS = {
    "v5p": (0.7147, "MaxText configs/v5p/README.md: 32B on 1x v5p-128, 71.47% MFU"),
    "v6e": (0.5033, "MaxText docs/reference/models/tiering.md: Llama 3.1 70B on v6e-256, 50.33% MFU"),
    "v5e": (0.6686, "MaxText configs/v5e/README.md: 32B on 1x v5e-256, 66.86% MFU"),
    "v4": (0.7147, "no v4 figure collected: v5p's (MaxText 32B on v5p-128, 71.47%)"),
    "h200": (0.47, "Megatron-LM README: up to 47% MFU on H100 (the same 989 TFLOP/s dense bf16 peak)"),
}
# Written from `python benchmarks/bench_step_time.py` (its fit of the committed points;
# tests/test_step_time_calibration.py checks that they agree); families without points of their
# own (v5e, v4) take the TPU families' lowest shares and widest range.
CALIBRATION: dict[str, Calibration] = {fam: Calibration(*v, *CAPS[fam]) for fam, v in {
    # compute, hbm, hbm_fitted, hbm_low, low, high, points, loo_error
    "v5p": (0.79, 0.79, False, 0.3, 0.9385, 1.0659, ("maxtext_llama2-70b_v5p-128", "maxtext_32b_v5p-128"), 0.0655),
    "v6e": (0.5, 0.5, False, 0.3, 0.9129, 1.0943, ("maxtext_llama3.1-8b_v6e-256", "maxtext_llama2-70b_v6e-256"),
            0.0954),
    "h200": (0.41, 0.3, True, 0.3, 0.8973, 1.1079, ("h200_0.6b_full", "h200_0.6b_save_attn_mlp",
                                                    "h200_1.7b_save_attn_mlp", "h200_30b-a3b_4L_blocked"), 0.1144),
    "v5e": (0.5, 0.5, False, 0.3, 0.9129, 1.0943, (), None),
    "v4": (0.5, 0.5, False, 0.3, 0.9129, 1.0943, (), None),
}.items()}

_COMPUTE_GRID = tuple(round(0.1 + 0.005 * i, 3) for i in range(181))  # 0.100 .. 1.000
_HBM_GRID = tuple(round(0.2 + 0.01 * i, 2) for i in range(81))  # 0.20 .. 1.00
_FLAT = 1e-9  # objective changes below this do not determine a share


def timed(t: dict, compute_share: float, hbm_share: float) -> float:
    """`estimate`'s formula with compute and HBM at the given shares of their peaks."""
    core = max(t["compute_s"] / compute_share, t["hbm_s"] / hbm_share)
    transfers = t["ici_s"] + t["dcn_s"] + t["host_offload_s"]
    return core + max(0.0, transfers - OVERLAP * core)


def _sq(points: list[dict], c: float, m: float) -> float:
    return sum(math.log(timed(p["terms"], c, m) / p["measured_s"]) ** 2 for p in points)


def fit(points: list[dict]) -> dict:
    """Least squares in log time over `points` ({name, family, terms: `estimate`'s per-unit
    seconds, measured_s}), per chip family on fixed grids (deterministic): its compute share and,
    from 3 points on (two shares on two points fit anything), its HBM share. Where the points do
    not determine the HBM share (fewer than 3, or none HBM-bound at any share that fits as well),
    it is taken equal to the compute share (`hbm_fitted` False). Returns {family: {compute, hbm,
    hbm_fitted}}."""
    out = {}
    for fam in sorted({p["family"] for p in points}):
        mine = [p for p in points if p["family"] == fam]
        grid = _HBM_GRID if len(mine) >= 3 else (None,)
        err = {(c, m): _sq(mine, c, m or c) for c in _COMPUTE_GRID for m in grid}
        least = min(err.values())
        c, m = min((k for k, v in err.items() if v <= least + _FLAT), key=lambda k: (-k[0], -(k[1] or 0)))
        flat = [k[1] for k, v in err.items() if k[0] == c and v <= least + _FLAT]
        fitted = m is not None and (not (min(flat) <= c <= max(flat)) or len(flat) == 1)
        out[fam] = {"compute": c, "hbm": m if fitted else c, "hbm_fitted": fitted}
    return out


def leave_one_out(points: list[dict]) -> dict[str, float]:
    """Each point's time predicted by its family's fit on the family's other points (a family
    left without points: the others' geometric mean shares)."""
    out = {}
    for p in points:
        rest = [q for q in points if q is not p]
        mine = [q for q in rest if q["family"] == p["family"]]
        shares = fit(mine or rest)
        s = shares.get(p["family"]) or {k: math.exp(sum(math.log(v[k]) for v in shares.values()) / len(shares))
                                         for k in ("compute", "hbm")}
        out[p["name"]] = timed(p["terms"], s["compute"], s["hbm"])
    return out


def calibrations(points: list[dict]) -> dict[str, Calibration]:
    """The fit of `points` as one `Calibration` per chip family of CAPS."""
    shares, loo = fit(points), leave_one_out(points)
    worst = min([s["hbm"] for s in shares.values() if s["hbm_fitted"]] or [1.0])
    out = {}
    for fam, (cap, source) in CAPS.items():
        mine = [p for p in points if p["family"] == fam]
        if mine:
            ratios = [p["measured_s"] / loo[p["name"]] for p in mine]
            s = shares[fam]
            out[fam] = Calibration(s["compute"], s["hbm"], s["hbm_fitted"], s["hbm"] if s["hbm_fitted"] else
                                   min(s["hbm"], worst), round(min(1.0, *ratios), 4),
                                   round(max(1.0, *ratios), 4), tuple(p["name"] for p in mine),
                                   round(max(abs(1 / r - 1) for r in ratios), 4), cap, source)
    tpu = [c for f, c in out.items() if f.startswith("v")]
    for fam, (cap, source) in CAPS.items():
        if fam not in out and tpu:
            out[fam] = Calibration(min(c.compute for c in tpu), min(c.hbm for c in tpu), False,
                                   min(c.hbm_low for c in tpu), min(c.low for c in tpu),
                                   max(c.high for c in tpu), (), None, cap, source)
    return out


def calibrate(fam: str | None, t: dict, model_flops: float) -> dict | None:
    """The calibrated step time (point and range, seconds) and MFU for `estimate`'s terms `t` on a
    chip of family `fam`; None when the family has no calibration."""
    c = CALIBRATION.get(fam)
    if c is None:
        return None
    peak = CHIPS[fam].peak_flops
    point = timed(t, c.compute, c.hbm)
    floor = model_flops / (c.cap_mfu * peak)  # no faster than the best published MFU on the chip
    slow = timed(t, c.compute, c.hbm_low) * c.high  # an HBM share the points did not fix: the lowest fitted
    est, low, high = (max(x, floor) for x in (point, point * c.low, slow))
    mfu = lambda s: model_flops / (s * peak)  # noqa: E731
    return {"estimate_s": est, "low_s": low, "high_s": high, "predicted_mfu": mfu(est), "mfu_low": mfu(high),
            "mfu_high": mfu(low), "capped": point < floor, "family": fam, "compute_share": c.compute,
            "hbm_share": c.hbm, "hbm_fitted": c.hbm_fitted, "hbm_share_slow_end": c.hbm_low, "points": list(c.points),
            "loo_error": c.loo_error, "cap_mfu": c.cap_mfu, "cap_source": c.cap_source,
            "label": "modelled: compiled FLOPs / HBM bytes / wire bytes at the fitted shares of the chip's peaks"}


def report_terms(report: dict, fam: str | None = None, single_device: bool = False) -> dict:
    """`estimate` for a saved AOT report (its HLO-derived fields) on chip family `fam` (default:
    the report's own); `single_device`: a one-GPU program, no collectives."""
    own = family(report.get("libtpu_topology", ""))
    chip = CHIPS[fam or own]
    st = report.get("step_time") or {}
    dcn = 0.0 if single_device or own is None else st.get("dcn_s", 0.0) * CHIPS[own].dcn_bytes_per_s
    return estimate(chip, flops=report["flops_per_chip"], model_flops=report["model_flops_per_chip"],
                    hbm_bytes=report["hbm_traffic_bytes_per_chip"], dcn_wire_bytes=dcn,
                    ici_wire_bytes=0.0 if single_device else ici_wire_bytes(report["collectives"]),
                    offload_bytes=report.get("host_offload_bytes_per_chip") or 0.0)


def summary_line(t: dict) -> str:
    ms = lambda s: f"{s * 1e3:,.0f} ms"  # noqa: E731
    bound = (f"bound (every unit at its peak, perfect overlap): {ms(t['lower_bound_s'])}; compute "
             f"{ms(t['compute_s'])}, HBM {ms(t['hbm_s'])}, ICI {ms(t['ici_s'])}, DCN {ms(t['dcn_s'])}, host offload "
             f"{ms(t['host_offload_s'])}")
    c = t.get("calibrated")
    if not c:
        mfu = f"{t['predicted_mfu']:.0%}" if t.get("predicted_mfu") else "-"
        return f"step time (uncalibrated): {ms(t['estimate_s'])}, MFU {mfu}; {bound}"
    loo = f"leave-one-out error up to {c['loo_error']:.0%}" if c.get("loo_error") is not None else \
        f"no measured {c['family']} points: the TPU families' lowest shares"
    hbm = "" if c["hbm_fitted"] else f" (not fitted: = compute; slow end {c['hbm_share_slow_end']:.0%})"
    return (f"step time (calibrated): {ms(c['estimate_s'])} ({ms(c['low_s'])} - {ms(c['high_s'])}), MFU "
            f"{c['predicted_mfu']:.0%} ({c['mfu_low']:.0%} - {c['mfu_high']:.0%}){' CAPPED' if c['capped'] else ''}\n"
            f"    calibration ({c['family']}): compute at {c['compute_share']:.0%} of peak, HBM at {c['hbm_share']:.0%}"
            f"{hbm}, "
            f"fitted on {', '.join(c['points']) or '-'} ({loo}); no faster than {c['cap_mfu']:.1%} MFU "
            f"({c['cap_source']})\n    {bound}")
