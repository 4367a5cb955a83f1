"""Pick the layer remat policy for a slice: compile the candidates, keep the fastest that fits.

`launch/aot_compile.py --remat auto` (pruned) and `--remat_search` (every candidate) call `search`
with a function that compiles the real step for one policy (`model_config.remat = '<policy>'`,
everything else from the training command's gin files) and returns its AOT report. The choice
(`rank`): among the candidates whose peak HBM is at most `headroom` x HBM (and whose host-offloaded
buffers fit the host's RAM per chip), the fewest compiled FLOPs among those whose calibrated
predicted step time (`qwen3_jax.step_time.calibrate`: the compiled program's FLOPs, HBM bytes and
wire bytes at the shares of the chip's peaks fitted on measured steps) is within 2% of the
fastest's. The calibrated time decides, not FLOPs alone: keeping the MoE experts' gate/up outputs
(`moe_wi`) saves recomputing two of their three matmuls, but on an HBM-bound step the extra ops
over the dropless buffer cost more than the FLOPs save (235B-A22B stage 1, benchmarks/aot_reports/
235b_s1.json). Without a calibrated prediction (train.py at startup, CPU) FLOPs alone decide,
within 0.5%. Nothing is changed silently: the result is a report row per candidate and the gin
line to write into the slice file. `recalibrated` re-ranks the rows of a saved search.

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


_TERMS = ("compute_s", "hbm_s", "ici_s", "dcn_s", "host_offload_s")


def row(policy: str, report: dict, headroom: float) -> dict:
    t = report.get("step_time") or {}
    c = t.get("calibrated")
    if c is None and "compute_s" in t and report.get("model_flops_per_chip"):  # a report saved before calibration
        c = step_time.calibrate(step_time.family(report.get("libtpu_topology", "")), t, report["model_flops_per_chip"])
    c = c or {}
    return {"policy": policy, "compiled": True, "fits": fits(report, headroom),
            "peak_gib": (report.get("bytes_per_chip_peak") or 0) / 2**30,
            "host_gib": (report.get("host_temp_bytes_per_chip") or 0) / 2**30,
            "flops_per_chip": report.get("flops_per_chip"),
            "flops_ratio": report.get("flops_ratio_compiled_to_model"),
            "estimate_s": c.get("estimate_s"), "low_s": c.get("low_s"), "high_s": c.get("high_s"),
            "predicted_mfu": c.get("predicted_mfu"), "uncalibrated_s": t.get("estimate_s"),
            "terms": {k: t[k] for k in _TERMS if k in t} or None, "step_program": report.get("step_program")}


def recalibrated(r: dict, report: dict, fam: str | None) -> dict:
    """A saved search row with the calibrated time of today's `step_time.CALIBRATION`. Its
    per-unit times: the row's own (`terms`), else the report's fields when the row is the
    report's program, else rebuilt from the row's FLOPs (compute) and its uncalibrated estimate:
    above the compute term, that estimate is the HBM term (transfers hidden, as in every saved
    search); at it, HBM is at most compute (taken equal: an upper bound); without one, compute
    alone (a lower bound). `terms_source` says which."""
    out = dict(r)
    if "uncalibrated_s" not in r:  # rows saved before the calibration: estimate_s was uncalibrated
        out["uncalibrated_s"] = r.get("estimate_s")
    out.update(estimate_s=None, low_s=None, high_s=None, predicted_mfu=None)
    if not (r.get("compiled") and r.get("fits") and r.get("flops_per_chip")) or fam not in step_time.CHIPS:
        return out
    old = out["uncalibrated_s"]
    if r.get("terms"):
        t, src = dict(r["terms"]), "row"
    elif r.get("step_program") == report.get("step_program") and report.get("hbm_traffic_bytes_per_chip"):
        t, src = step_time.report_terms(report, fam), "report (HLO-derived fields)"
    else:
        compute = r["flops_per_chip"] / step_time.CHIPS[fam].peak_flops
        hbm, src = ((old, "HBM = the uncalibrated estimate (above compute)") if old and old > compute * (1 + 1e-6)
                    else (compute, "HBM <= compute, taken equal (upper bound)") if old
                    else (0.0, "compute only: no HLO kept (lower bound)"))
        t = {"compute_s": compute, "hbm_s": hbm, "ici_s": 0.0, "dcn_s": 0.0, "host_offload_s": 0.0}
    model_flops = r["flops_per_chip"] / r["flops_ratio"] if r.get("flops_ratio") else r["flops_per_chip"]
    c = step_time.calibrate(fam, t, model_flops) or {}
    out.update(estimate_s=c.get("estimate_s"), low_s=c.get("low_s"), high_s=c.get("high_s"),
               predicted_mfu=c.get("predicted_mfu"), terms={k: t[k] for k in _TERMS}, terms_source=src)
    return out


def rank(rows: list[dict]) -> tuple[str | None, str | None]:
    """(choice, runner-up) among the compiled rows that fit: the fastest calibrated prediction,
    among those within TIME_TIE of it the fewest FLOPs; FLOPs alone (within FLOPS_TIE) when a row
    has no prediction. The runner-up: the same rule over the rest."""
    def best(ok):
        if not ok:
            return None
        if all(r.get("estimate_s") for r in ok):
            fastest = min(r["estimate_s"] for r in ok)
            ok = [r for r in ok if r["estimate_s"] <= fastest * (1 + TIME_TIE)]
        least = min(r["flops_per_chip"] for r in ok)
        tied = [r for r in ok if r["flops_per_chip"] <= least * (1 + FLOPS_TIE)]
        return min(tied, key=lambda r: (r.get("estimate_s") or 0.0, r["flops_per_chip"]))["policy"]

    ok = [r for r in rows if r.get("compiled") and r.get("fits")]
    first = best(ok)
    return first, best([r for r in ok if r["policy"] != first])


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
    choice, _ = rank(rows)
    return choice, (reports[choice] if choice else None), rows


def format_rows(rows: list[dict], choice: str | None, headroom: float) -> str:
    fit = [r for r in rows if r["compiled"] and r["fits"]]
    rule = f"the fastest calibrated predicted step within {TIME_TIE:.0%}, then fewest FLOPs" \
        if fit and all(r.get("estimate_s") for r in fit) else "fewest FLOPs (no calibrated step-time prediction)"
    lines = [f"  remat candidates (fits: peak <= {headroom:.0%} of HBM; {rule}):",
             f"    {'policy':<21} {'peak GiB':>9} {'host GiB':>9} {'FLOPs/model':>12} {'step (modelled) [range]':>24} "
             f"{'MFU':>5}"]
    for r in rows:
        mark = "*" if r["policy"] == choice else " "
        if not r["compiled"]:
            lines.append(f"  {mark} {r['policy']:<21} not compiled: {r['reason']}")
            continue
        ratio = f"{r['flops_ratio']:.3f}" if r.get("flops_ratio") else "-"
        est = f"{r['estimate_s']:.2f} s [{r['low_s']:.2f}-{r['high_s']:.2f}]" if r.get("estimate_s") else "-"
        mfu = f"{r['predicted_mfu']:.0%}" if r.get("predicted_mfu") else "-"
        src = f"  ({r['terms_source']})" if r.get("terms_source") and r["terms_source"] != "row" else ""
        lines.append(f"  {mark} {r['policy']:<21} {r['peak_gib']:9.1f} {r['host_gib']:9.1f} {ratio:>12} {est:>24} "
                     f"{mfu:>5}  {'fits' if r['fits'] else 'does not fit'}{src}")
    return "\n".join(lines)
