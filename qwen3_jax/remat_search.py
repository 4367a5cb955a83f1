"""Pick the layer remat policy for a slice: compile the candidates, keep the fastest that fits.

`launch/aot_compile.py --remat auto` (pruned) and `--remat_search` (every candidate) call `search`
with a function that compiles the real step for one policy (`model_config.remat = '<policy>'`,
everything else from the training command's gin files) and returns its AOT report. The choice:
among the candidates whose peak HBM is at most `headroom` x HBM (and whose host-offloaded
buffers fit the host's RAM per chip), the fewest compiled FLOPs among those whose predicted step
time (`qwen3_jax.step_time`, TPU targets) is within 2% of the fastest's. Fewer FLOPs are not
always faster: keeping the MoE experts' gate/up outputs (`moe_wi`) saves recomputing two of their
three matmuls, but on an HBM-bound step the extra ops over the dropless buffer cost more than the
FLOPs save (235B-A22B stage 1, benchmarks/aot_reports/235b_s1.json). Without a prediction (train.py
at startup) FLOPs alone decide, within 0.5%. Nothing is changed silently: the result is a report
row per candidate and the gin line to write into the slice file.

Pruning (`--remat auto`): a policy that keeps fewer of the tensors a fitting policy keeps, and no
more of them in HBM, can only recompute more; one that keeps the same ones but offloads at least
as many can only move more to the host (skipped: "dominated"); one that keeps in HBM a superset
of what a policy that does not fit keeps cannot fit either (skipped: "cannot fit").
"""

from __future__ import annotations

from typing import Callable

from qwen3_jax import step_time
from qwen3_jax.config import REMAT_NAMES, REMAT_POLICIES, ModelConfig

HEADROOM = 0.9
FLOPS_TIE = 0.005
TIME_TIE = 0.02
# most kept first: the first candidates that fit prune the rest
CANDIDATES = ("none", "save_attn_mlp", "save_attn_moe", "offload_attn_mlp", "save_moe_offload_attn", "save_attn_out",
              "offload_attn", "save_mlp", "save_moe", "save_attn", "save_qkv_proj", "offload_context", "full")
_EVERYTHING = frozenset({"*"})  # 'none' keeps every intermediate


def kept(policy: str) -> tuple[frozenset, frozenset]:
    """(names kept anywhere, names kept in HBM) of a named policy; None for XLA's dot policies."""
    if policy == "none":
        return _EVERYTHING, _EVERYTHING
    if policy == "full":
        return frozenset(), frozenset()
    if policy not in REMAT_NAMES:
        return None
    saved, offloaded = REMAT_NAMES[policy]
    return frozenset(saved) | frozenset(offloaded), frozenset(saved)


def _subset(a: frozenset, b: frozenset) -> bool:
    return b == _EVERYTHING or (a != _EVERYTHING and a <= b)


def candidates(cfg: ModelConfig, platform: str, only: list[str] | None = None) -> list[str]:
    """The policies to try for `cfg` on `platform`, most kept first. Without `only`: no dense-MLP
    (MoE) names for a model without dense (MoE) layers (they would repeat the attention-only
    policies), no host offload off TPU (the host's RAM is the device's memory there)."""
    if only:
        bad = [p for p in only if p not in REMAT_POLICIES]
        if bad:
            raise ValueError(f"remat candidates {bad} are not among ModelConfig.remat's {REMAT_POLICIES}")
        return list(only)
    kinds = {moe for moe, _, _ in cfg.layer_runs()}
    out = []
    for p in CANDIDATES:
        names, in_hbm = kept(p)
        if names != _EVERYTHING and (("mlp_wi" in names and False not in kinds) or
                                     ("moe_wi" in names and True not in kinds)):
            continue
        if platform != "tpu" and names != in_hbm:  # host offload
            continue
        out.append(p)
    return out


def fits(report: dict, headroom: float = HEADROOM) -> bool:
    """Peak HBM within `headroom` of HBM, and host-offloaded temporaries within the host's RAM per chip."""
    peak = report.get("bytes_per_chip_peak")
    if peak is None or report.get("flops_per_chip") is None:
        return False
    chip = step_time.chip_for(report.get("libtpu_topology", ""))
    host = report.get("host_temp_bytes_per_chip", 0) or 0
    host_ok = chip is None or chip.host_ram_bytes is None or host <= headroom * chip.host_ram_bytes
    return peak <= headroom * report["hbm_bytes_per_chip"] and host_ok


def _skip(policy: str, rows: list[dict]) -> str | None:
    k = kept(policy)
    if k is None:
        return None
    for r in rows:
        other = kept(r["policy"])
        if not r["compiled"] or other is None:
            continue
        same = k[0] == other[0]
        offloads_more = not (other[0] - other[1]) - (k[0] - k[1]) if same else False
        if r["fits"] and ((_subset(k[0], other[0]) and _subset(k[1], other[1]) and not same) or offloads_more):
            return f"dominated by {r['policy']} (keeps {'the same tensors, no more in HBM,' if same else 'more'} and fits)"
        if not r["fits"] and _subset(other[1], k[1]) and _subset(other[0], k[0]):
            return f"cannot fit: keeps in HBM at least what {r['policy']} keeps, which does not fit"
    return None


def row(policy: str, report: dict, headroom: float) -> dict:
    t = report.get("step_time") or {}
    return {"policy": policy, "compiled": True, "fits": fits(report, headroom),
            "peak_gib": (report.get("bytes_per_chip_peak") or 0) / 2**30,
            "host_gib": (report.get("host_temp_bytes_per_chip") or 0) / 2**30,
            "flops_per_chip": report.get("flops_per_chip"),
            "flops_ratio": report.get("flops_ratio_compiled_to_model"),
            "estimate_s": t.get("estimate_s"), "predicted_mfu": t.get("predicted_mfu"),
            "step_program": report.get("step_program")}


def search(compile_policy: Callable[[str], dict], policies: list[str], headroom: float = HEADROOM,
           prune: bool = True) -> tuple[str | None, dict | None, list[dict]]:
    """Compiles the policies in order (skipping dominated / hopeless ones when `prune`); returns
    (chosen policy or None, its report, one row per candidate)."""
    rows, reports = [], {}
    for p in policies:
        reason = _skip(p, rows) if prune else None
        if reason:
            rows.append({"policy": p, "compiled": False, "reason": reason})
            continue
        reports[p] = compile_policy(p)
        rows.append(row(p, reports[p], headroom))
    ok = [r for r in rows if r["compiled"] and r["fits"]]
    if not ok:
        return None, None, rows
    if all(r["estimate_s"] for r in ok):  # the fastest predicted, then the fewest FLOPs
        fastest = min(r["estimate_s"] for r in ok)
        ok = [r for r in ok if r["estimate_s"] <= fastest * (1 + TIME_TIE)]
    least = min(r["flops_per_chip"] for r in ok)
    tied = [r for r in ok if r["flops_per_chip"] <= least * (1 + FLOPS_TIE)]
    best = min(tied, key=lambda r: (r["estimate_s"] if r["estimate_s"] is not None else 0.0, r["flops_per_chip"]))
    return best["policy"], reports[best["policy"]], rows


def format_rows(rows: list[dict], choice: str | None, headroom: float) -> str:
    fit = [r for r in rows if r["compiled"] and r["fits"]]
    rule = f"the fastest predicted step within {TIME_TIE:.0%}, then fewest FLOPs" \
        if fit and all(r["estimate_s"] for r in fit) else "fewest FLOPs (no step-time prediction)"
    lines = [f"  remat candidates (fits: peak <= {headroom:.0%} of HBM; {rule}):",
             f"    {'policy':<18} {'peak GiB':>9} {'host GiB':>9} {'FLOPs/model':>12} {'est. step':>10} {'MFU':>5}"]
    for r in rows:
        mark = "*" if r["policy"] == choice else " "
        if not r["compiled"]:
            lines.append(f"  {mark} {r['policy']:<18} not compiled: {r['reason']}")
            continue
        ratio = f"{r['flops_ratio']:.3f}" if r.get("flops_ratio") else "-"
        est = f"{r['estimate_s'] * 1e3:,.0f} ms" if r.get("estimate_s") else "-"
        mfu = f"{r['predicted_mfu']:.0%}" if r.get("predicted_mfu") else "-"
        lines.append(f"  {mark} {r['policy']:<18} {r['peak_gib']:9.1f} {r['host_gib']:9.1f} {ratio:>12} {est:>10} "
                     f"{mfu:>5}  {'fits' if r['fits'] else 'does not fit'}")
    return "\n".join(lines)
