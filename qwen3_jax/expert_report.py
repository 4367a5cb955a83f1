"""Where an MoE model's tokens go: expert-load heatmaps and per-domain expert specialization.

Two views of one training run (a workdir written by `qwen3_jax.train.loop.train`):

  load        from metrics.jsonl: `expert_counts` ([MoE layers][experts] assignments of each
              step), summed over the last N logged steps and normalised per layer. A layer's load
              is its busiest expert's share of the layer's assignments × E, the metric
              `expert_load_max` of training: 1 = even; at most E/k with top-k routing (every
              token picks that expert: collapsed), e.g. 4 for 8 experts top-2.
  domains     from the checkpoint: the model runs forward only (jitted, one device) on held-out
              tokens of each dataset and counts each layer's top-k assignments; per layer, each
              domain's routing distribution over experts and the Jensen-Shannon divergence
              between domains' distributions (base 2, in [0, 1]: 0 = same routing, 1 = disjoint
              experts). The specialization score is its mean over layers (for more than two
              domains: the mean over layers of the mean over domain pairs).

arXiv 2501.11873's headline is that balancing over the global batch instead of each micro-batch
lets experts specialise by domain; the score measures that. Routing uses the aux-loss-free
selection bias when the run trained with one (it lives in the checkpoint's train state), so the
counts are the ones training saw.

    report = add_domains(load_report("runs/x", last=50), {"code": "data/code", "docs": "data/docs"})
    png, json_path = write_report(report, "runs/x/expert_load.png")
    print(summary(report))

(`launch/expert_report.py` is the command: flags, the run's datasets from its gin file, printing.)
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from data_pipeline.pipeline import DatasetSpec, make_dataset
from qwen3_jax import checkpoint as ckpt
from qwen3_jax import storage
from qwen3_jax.config import ModelConfig
from qwen3_jax.errors import ReportError
from qwen3_jax.params import flatten, model_from_flat, nest

# -- load over training steps (metrics.jsonl) -------------------------------------------------------

def read_expert_counts(metrics_path: str | os.PathLike, last: int | None = None) -> tuple[list[int], np.ndarray]:
    """(steps, counts [N, MoE layers, experts]) of the last `last` logged train steps (all when
    None) that carry `expert_counts`. A step logged twice (a resumed run) keeps its last line."""
    path = storage.path(metrics_path)  # a local file or a gs:// object
    if not path.is_file():
        raise ReportError(f"{path}: no such file (a training workdir has metrics.jsonl)")
    by_step: dict[int, list] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # the last line cut short by a crash: skip it
                continue
            raise ReportError(f"{path}:{n}: not JSON ({e})") from None
        if rec.get("split", "train") == "train" and "expert_counts" in rec:
            by_step[int(rec["step"])] = rec["expert_counts"]
    if not by_step:
        raise ReportError(f"{path}: no train step with expert_counts (not an MoE run, or written before "
                          f"expert counts were logged)")
    if last is not None and last <= 0:
        raise ReportError(f"--last {last}: must be > 0")
    steps = sorted(by_step)[-last:] if last else sorted(by_step)
    try:
        counts = np.asarray([by_step[s] for s in steps], np.float64)
    except ValueError:
        raise ReportError(f"{path}: expert_counts have different shapes across steps") from None
    if counts.ndim != 3:
        raise ReportError(f"{path}: expert_counts should be [MoE layers][experts], got shape {counts.shape[1:]}")
    return steps, counts


def shares(counts_LE: np.ndarray) -> np.ndarray:
    """Per-layer share of assignments [L,E] (rows sum to 1; an empty row stays 0)."""
    c = np.asarray(counts_LE, np.float64)
    return c / np.maximum(c.sum(-1, keepdims=True), 1e-30)


def layer_loads(shares_LE: np.ndarray) -> np.ndarray:
    """Each layer's load: largest expert share × E (1 = even, E/k = collapsed)."""
    return shares_LE.max(-1) * shares_LE.shape[-1]


HEATMAP_DPI = 100


def heatmap_inches(num_layers: int, num_experts: int) -> tuple[float, float]:
    """The heatmap's figure size (width, height) in inches; pixels = inches × HEATMAP_DPI."""
    return min(max(7.0, 2.5 + 0.5 * num_experts), 24.0), min(2.4 + 0.45 * num_layers, 30.0)


def plot_load_heatmap(shares_LE: np.ndarray, out: str | os.PathLike, *, title: str = "",
                      layer_labels: Sequence[str] | None = None) -> str:
    """PNG heatmap of [MoE layers, experts] shares (written to `out`, local or gs://); cells
    annotated when the grid is small."""
    try:
        import matplotlib  # optional: the [report] extra (pictures only)
    except ImportError:
        raise ReportError("drawing the heatmap needs matplotlib: pip install 'qwen3-jax[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: as above

    L, E = shares_LE.shape
    labels = list(layer_labels) if layer_labels is not None else [f"MoE {i}" for i in range(L)]
    fig, ax = plt.subplots(figsize=heatmap_inches(L, E), dpi=HEATMAP_DPI)
    vmax = max(float(shares_LE.max()), 1e-9)
    im = ax.imshow(shares_LE, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    if E <= 64:
        ax.set_xticks(range(E))
    if L <= 64:
        ax.set_yticks(range(L), labels)
    if E <= 16 and L <= 32:
        for i, j in itertools.product(range(L), range(E)):
            v = shares_LE[i, j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.6 * vmax else "white")
    fig.colorbar(im, ax=ax, label="share of assignments")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    storage.write_bytes(out, png.getvalue())
    return str(out)


# -- routing per domain (forward pass on held-out tokens) -------------------------------------------

def moe_layer_ids(cfg: ModelConfig) -> list[int]:
    """The model layer index of each MoE layer (the rows of every [L, E] array here)."""
    return [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]


def read_router_bias(workdir: str | os.PathLike, step: int) -> np.ndarray | None:
    """The aux-loss-free routing bias [MoE layers, E] a training checkpoint holds, else None."""
    root, _ = ckpt.checkpoint_root(workdir)
    if not (root / str(step) / ckpt.TRAIN_STATE).is_dir():
        return None
    absl_log = logging.getLogger("absl")  # orbax warns about every item not asked for
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), ckpt.manager(root, create=False) as mgr:
            warnings.simplefilter("ignore", UserWarning)
            t = mgr.restore(step, args=ocp.args.Composite(**{ckpt.TRAIN_STATE: ocp.args.PyTreeRestore()}))
    finally:
        absl_log.setLevel(level)
    bias = (t[ckpt.TRAIN_STATE].get("moe") or {}).get("bias")
    return None if bias is None else np.asarray(bias, np.float32)


_COUNT_FNS: dict[Any, Any] = {}


def _count_fn(cfg: ModelConfig):
    """jit((params, tokens, positions, segment_ids, bias) -> (counts [L,E], tokens)), one per config."""
    if cfg not in _COUNT_FNS:
        def count(params, tokens_BT, positions_BT, segment_ids_BT, bias_LE):
            model = model_from_flat(cfg, flatten(params))
            _, stats = model.hidden(tokens_BT, positions_BT, segment_ids_BT, router_bias=bias_LE)
            return stats["counts"].sum(1), stats["tokens"].sum()

        _COUNT_FNS[cfg] = jax.jit(count)
    return _COUNT_FNS[cfg]


def routing_counts(cfg: ModelConfig, params: Mapping[str, Any], data_path: str, *, max_tokens: int,
                   seq_len: int = 512, batch_size: int = 8, split: str | None = "heldout",
                   heldout_fraction: float = 0.02, router_bias: np.ndarray | None = None
                   ) -> tuple[np.ndarray, int]:
    """(assignment counts [MoE layers, E], tokens routed) over the first `max_tokens` tokens of a
    prepared dataset's `split` (packed as in training, unshuffled). `params`: flat or nested."""
    if not cfg.is_moe:
        raise ReportError(f"model {cfg.name} has no MoE layers: nothing is routed")
    if max_tokens <= 0:
        raise ReportError(f"max_tokens={max_tokens}: must be > 0")
    flat = flatten(params) if any(isinstance(v, Mapping) for v in params.values()) else dict(params)
    dev_params = jax.device_put(nest(flat))
    bias = None if router_bias is None else jax.device_put(np.asarray(router_bias, np.float32))
    if bias is not None and bias.shape != (cfg.num_moe_layers, cfg.num_experts):
        raise ReportError(f"router bias has shape {bias.shape}, the model routes "
                          f"[{cfg.num_moe_layers}, {cfg.num_experts}]")
    spec = DatasetSpec(path=data_path, split=split, heldout_fraction=heldout_fraction if split else 0.0)
    try:
        it = make_dataset(spec, seq_len=seq_len, global_batch_size=batch_size, num_epochs=1, shuffle=False,
                          process_index=0, process_count=1)
    except (ValueError, FileNotFoundError) as e:
        raise ReportError(f"dataset {data_path} (split={split}): {e}") from None
    fn = _count_fn(cfg)
    total = np.zeros((cfg.num_moe_layers, cfg.num_experts), np.float64)
    seen = 0
    for batch in it:
        seg = np.asarray(batch["segment_ids"])
        real = seg > 0
        # Exactly max_tokens: tokens past the budget become padding (same shapes, no recompile).
        keep = (np.cumsum(real.reshape(-1)) <= max_tokens - seen).reshape(real.shape) & real
        seg = np.where(keep, seg, 0)
        counts, n = fn(dev_params, batch["tokens"], batch["positions"], seg, bias)
        total += np.asarray(counts, np.float64)
        seen += int(n)
        if seen >= max_tokens:
            break
    if not seen:
        raise ReportError(f"dataset {data_path} (split={split}): no tokens")
    return total, seen


# -- specialization ---------------------------------------------------------------------------------

def js_divergence(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Jensen-Shannon divergence in bits between two distributions (counts are normalised):
    JS = H((p+q)/2) - (H(p) + H(q))/2, in [0, 1]; 0 iff p == q, 1 iff disjoint supports."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ReportError(f"js_divergence: need two 1-D distributions of one size, got {p.shape} and {q.shape}")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise ReportError("js_divergence: distributions need non-negative entries and a positive sum")
    p, q = p / p.sum(), q / q.sum()

    def entropy(x):
        x = x[x > 0]
        return float(-(x * np.log2(x)).sum())

    return float(min(max(entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2, 0.0), 1.0))


def specialization(domain_counts: Mapping[str, np.ndarray], layer_ids: Sequence[int] | None = None,
                   top: int = 3) -> dict:
    """Per layer: each domain's routing summary (top experts with shares, load, normalised entropy)
    and the JS divergence of every domain pair; `score` = mean over layers of the mean pair JS."""
    names = list(domain_counts)
    if not names:
        raise ReportError("no domains to compare")
    arrays = {n: np.asarray(domain_counts[n], np.float64) for n in names}
    shapes = {n: a.shape for n, a in arrays.items()}
    if len(set(shapes.values())) != 1 or arrays[names[0]].ndim != 2:
        raise ReportError(f"domain counts must all be [MoE layers, experts] of one shape, got {shapes}")
    L, E = arrays[names[0]].shape
    layer_ids = list(layer_ids) if layer_ids is not None else list(range(L))
    pairs = list(itertools.combinations(names, 2))
    layers = []
    for i in range(L):
        dom = {}
        for n in names:
            s = shares(arrays[n][i])
            order = np.argsort(-s, kind="stable")[:top]
            ent = -float(np.sum(np.where(s > 0, s * np.log(np.where(s > 0, s, 1.0)), 0.0))) / math.log(E)
            dom[n] = {"top": [[int(e), float(s[e])] for e in order], "load": float(s.max() * E),
                      "entropy": ent, "shares": [float(x) for x in s]}
        js = {f"{a}|{b}": js_divergence(arrays[a][i], arrays[b][i]) for a, b in pairs}
        layers.append({"layer": int(layer_ids[i]), "moe_layer": i, "domains": dom, "js": js,
                       "js_mean": float(np.mean(list(js.values()))) if js else float("nan")})
    score = float(np.mean([r["js_mean"] for r in layers])) if pairs else float("nan")
    return {"domains": names, "experts": E, "layers": layers, "score": score}


def format_table(report: dict) -> str:
    """The per-layer routing table: each domain's top experts (expert:share) and the JS values."""
    names = report["domains"]
    pair_keys = list(report["layers"][0]["js"]) if report["layers"] else []
    head = f"{'layer':>5}  " + "  ".join(f"{n[:24] + ' top experts (load)':<38}" for n in names)
    head += "".join(f"  {'JS ' + k:>14}" for k in pair_keys)
    lines = [head]
    for r in report["layers"]:
        cells = []
        for n in names:
            d = r["domains"][n]
            cell = " ".join(f"{e}:{s:.2f}" for e, s in d["top"]) + " (%.2f)" % d["load"]
            cells.append(f"{cell:<38}")
        lines.append(f"{r['layer']:>5}  " + "  ".join(cells) + "".join(f"  {r['js'][k]:>14.4f}" for k in pair_keys))
    lines.append(f"specialization score (mean JS over layers): {report['score']:.4f}")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, obj: Any) -> str:
    """Writes `obj` as JSON to `path` (local or gs://, atomically); returns the path."""
    storage.write_text(path, json.dumps(obj, indent=1))
    return str(path)


# -- the whole report (launch/expert_report.py) -----------------------------------------------------

def load_report(workdir: str | os.PathLike, last: int = 50) -> dict:
    """The load view of `workdir`: expert shares over its last `last` logged steps."""
    workdir = storage.path(workdir)
    steps, counts_NLE = read_expert_counts(workdir / "metrics.jsonl", last)
    load_LE = shares(counts_NLE.sum(0))
    loads_L = layer_loads(load_LE)
    worst = int(loads_L.argmax())
    cfg_file = workdir / "model_config.json"
    top_k = json.loads(cfg_file.read_text()).get("num_experts_per_tok") if cfg_file.is_file() else None
    return {"workdir": str(workdir), "steps": [steps[0], steps[-1]], "logged_steps": len(steps), "top_k": top_k,
            "load_shares": load_LE.tolist(), "layer_load": loads_L.tolist(),
            "worst_layer": {"moe_layer": worst, "load": float(loads_L[worst])}, "specialization": None}


def add_domains(report: dict, data: Mapping[str, str], *, tokens: int = 32768, seq_len: int | None = None,
                batch_size: int = 8, split: str = "heldout", heldout_fraction: float = 0.02,
                step: int | None = None, router_bias: bool = True) -> dict:
    """The domains view added to `report` (from `load_report`): the run's checkpoint (`step`, default
    the latest) routes `tokens` held-out tokens of each prepared folder in `data` ({domain: folder})
    in rows of `seq_len` (default: training's, at most 1,024)."""
    workdir = storage.path(report["workdir"])
    cfg, flat, step, meta = ckpt.restore_params_numpy(workdir, step)
    bias = read_router_bias(workdir, step) if router_bias and meta.get("router_bias") else None
    seq_len = seq_len or min(int(meta.get("seq_len") or 512), 1024)
    per_domain, routed = {}, {}
    for name, path in data.items():
        per_domain[name], routed[name] = routing_counts(
            cfg, flat, path, max_tokens=tokens, seq_len=seq_len, batch_size=batch_size,
            split=None if split == "all" else "heldout", heldout_fraction=heldout_fraction, router_bias=bias)
    ids = moe_layer_ids(cfg)
    report["worst_layer"]["layer"] = ids[report["worst_layer"]["moe_layer"]]
    report.update(step=step, model=cfg.name, router_bias=bias is not None, seq_len=seq_len, data=dict(data),
                  tokens=routed, specialization=specialization(per_domain, ids), layer_ids=ids)
    return report


def write_report(report: dict, out: str | os.PathLike) -> tuple[str, str]:
    """The heatmap PNG of a report (`load_report`, perhaps `add_domains`) at `out` and the report as
    JSON beside it (same name, .json); both paths."""
    out = storage.path(out)
    load_LE, loads_L = np.asarray(report["load_shares"]), np.asarray(report["layer_load"])
    worst, (first, last) = report["worst_layer"]["moe_layer"], report["steps"]
    labels = [f"layer {i}" for i in report["layer_ids"]] if report.get("layer_ids") else None
    where = labels[worst] if labels else f"MoE layer {worst}"
    title = (f"{storage.path(report['workdir']).name}: expert share per layer, steps {first}-{last} "
             f"({report['logged_steps']} logged)\nexpert load max {loads_L[worst]:.2f} ({where}; "
             f"{load_scale(load_LE.shape[1], report.get('top_k'))})")
    domains = report.get("specialization")
    if domains is not None:
        title += f"\nspecialization (mean JS {' vs '.join(domains['domains'])}) {domains['score']:.3f}"
    png = plot_load_heatmap(load_LE, out, title=title, layer_labels=labels)
    return png, write_json(out.with_suffix(".json"), report)


def load_scale(num_experts: int, top_k: int | None) -> str:
    """What a load figure means, in the words the console, README and heatmap share."""
    top = f"{num_experts / top_k:g} = collapsed" if top_k else f"{num_experts}/top-k = collapsed"
    return f"1 = even, {top}"


def summary(report: dict) -> str:
    """What the command prints: per-layer load, and the routing table when the domains were routed."""
    loads_L, (first, last) = report["layer_load"], report["steps"]
    worst = report["worst_layer"]["moe_layer"]
    lines = [f"expert load (busiest expert's share x E) over steps {first}-{last}: per layer " +
             " ".join(f"{x:.2f}" for x in loads_L) + f" (max {loads_L[worst]:.2f}, MoE layer {worst}; "
             f"{load_scale(len(report['load_shares'][0]), report.get('top_k'))})"]
    if report.get("specialization") is not None:
        routed = ", ".join(f"{k} {v:,}" for k, v in report["tokens"].items())
        bias = ", with the aux-free router bias" if report["router_bias"] else ""
        lines += [f"routing on {routed} held-out tokens (checkpoint step {report['step']}{bias}):",
                  format_table(report["specialization"])]
    return "\n".join(lines)
