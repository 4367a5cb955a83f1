"""Expert load and per-domain specialization of an MoE training run.

  python launch/expert_report.py WORKDIR [--last N] [--out PNG] [--data NAME=DIR ...] [--tokens T]

Writes a heatmap (MoE layers × experts: each cell the expert's share of that layer's assignments,
summed over the last N logged steps of WORKDIR/metrics.jsonl; the title names the worst layer's
load = largest share × E), then runs the latest checkpoint's model forward on up to T held-out
tokens of each dataset and prints, per layer, each domain's top experts and the Jensen-Shannon
divergence (bits, in [0, 1]) between the domains' routing: the specialization score. Everything
also goes to a JSON file next to the PNG (same name, .json).

Without --data the datasets are the ones the run trained on, read from WORKDIR/config.gin
(`stage_mixture.*`); on the built-in corpus that is its `code` and `docs` folders (every non-code
mixture name reads docs). --skip_domains writes the heatmap only. Definitions:
qwen3_jax/train/expert_report.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from qwen3_jax import storage

from qwen3_jax.errors import ReportError


def _parse_data(values: list[str]) -> dict[str, str]:
    from data_pipeline.prepare import parse_named_datasets

    return parse_named_datasets(values)


def _data_from_config(workdir) -> tuple[dict[str, str], float]:
    """({domain: folder}, heldout_fraction) of the run's `stage_mixture` bindings; several mixture
    names reading one folder (the built-in corpus) become one domain named after the folder."""
    for name in ("config.gin", "operative_config.gin"):
        if (workdir / name).is_file():
            gin_file = workdir / name
            break
    else:
        raise ValueError(f"{workdir} has no config.gin or operative_config.gin: pass --data NAME=DIR")
    import gin

    from qwen3_jax import configurables

    try:
        with storage.staged(gin_file) as local:  # gin reads local files; a gs:// workdir's is fetched
            configurables.parse_gin([str(local)], [])
    except Exception as e:  # noqa: BLE001 - any gin failure: say which file, ask for --data
        raise ValueError(f"{gin_file}: cannot be parsed ({str(e).splitlines()[0]}): pass --data NAME=DIR") from None
    if configurables.query("stage_mixture.weights") is None:
        raise ValueError(f"{gin_file} binds no stage_mixture.weights: pass --data NAME=DIR")
    mixture = gin.get_configurable("stage_mixture")()
    by_path: dict[str, list[str]] = {}
    for spec in mixture.datasets:
        by_path.setdefault(spec.path, []).append(spec.key)
    out = {(names[0] if len(names) == 1 else os.path.basename(os.path.normpath(path))): path
           for path, names in by_path.items()}
    for d, path in out.items():
        if not (storage.path(path) / "stats.json").is_file():
            raise ValueError(f"{gin_file}: dataset {d} folder {path} is not prepared here: pass --data NAME=DIR")
    return out, float(configurables.query("stage_mixture.heldout_fraction", 0.02))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", help="training workdir (metrics.jsonl, checkpoints/)")
    p.add_argument("--last", type=int, default=50, help="logged steps summed in the heatmap (default 50)")
    p.add_argument("--out", default=None, help="heatmap PNG (default WORKDIR/expert_load.png); JSON beside it")
    p.add_argument("--data", action="append", default=[], metavar="NAME=DIR", help="prepared dataset (repeatable)")
    p.add_argument("--tokens", type=int, default=32768, help="held-out tokens routed per dataset")
    p.add_argument("--seq_len", type=int, default=None, help="rows of this many tokens (default: training's, <= 1024)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--split", choices=("heldout", "all"), default="heldout")
    p.add_argument("--heldout_fraction", type=float, default=None, help="default: the run's (0.02)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--no_router_bias", action="store_true", help="route without the aux-free bias of the run")
    p.add_argument("--skip_domains", action="store_true", help="heatmap only (no checkpoint, no data)")
    args = p.parse_args(argv)
    workdir = storage.path(args.workdir)  # local or gs://, as every path below
    out = storage.path(args.out) if args.out else workdir / "expert_load.png"

    def fail(msg: str) -> int:
        print(f"expert_report.py: error: {msg}", file=sys.stderr)
        return 2

    for flag in ("tokens", "batch_size", "last") + (("seq_len",) if args.seq_len is not None else ()):
        if getattr(args, flag) <= 0:
            return fail(f"--{flag} {getattr(args, flag)}: must be > 0")
    if not workdir.is_dir():
        return fail(f"workdir {workdir} does not exist")
    if not storage.is_remote(out) and not out.parent.is_dir():  # an object store has no folders to create
        return fail(f"--out {out}: folder {out.parent} does not exist")

    from qwen3_jax.train import expert_report as er

    try:
        steps, counts_NLE = er.read_expert_counts(workdir / "metrics.jsonl", args.last)
    except ReportError as e:
        return fail(str(e))
    load_LE = er.shares(counts_NLE.sum(0))
    loads_L = er.layer_loads(load_LE)
    worst = int(loads_L.argmax())
    report: dict = {"workdir": str(workdir), "steps": [steps[0], steps[-1]], "logged_steps": len(steps),
                    "load_shares": load_LE.tolist(), "layer_load": loads_L.tolist(),
                    "worst_layer": {"moe_layer": worst, "load": float(loads_L[worst])}}

    domains = None
    if not args.skip_domains:
        try:
            data = _parse_data(args.data)
            hf = args.heldout_fraction
            if not data:
                data, run_hf = _data_from_config(workdir)
                hf = run_hf if hf is None else hf
        except ValueError as e:
            return fail(str(e))
        from qwen3_jax.train.checkpoint import restore_params_numpy

        try:
            cfg, flat, step, meta = restore_params_numpy(workdir, args.step)
            bias = None if args.no_router_bias or not meta.get("router_bias") else er.read_router_bias(workdir, step)
            seq_len = args.seq_len or min(int(meta.get("seq_len") or 512), 1024)
            per_domain, tokens = {}, {}
            for name, path in data.items():
                per_domain[name], tokens[name] = er.routing_counts(
                    cfg, flat, path, max_tokens=args.tokens, seq_len=seq_len, batch_size=args.batch_size,
                    split=None if args.split == "all" else "heldout", heldout_fraction=0.02 if hf is None else hf,
                    router_bias=bias)
            domains = er.specialization(per_domain, er.moe_layer_ids(cfg))
        except (ReportError, FileNotFoundError, ValueError) as e:
            return fail(str(e))
        ids = er.moe_layer_ids(cfg)
        report["worst_layer"]["layer"] = ids[worst]
        report.update(step=step, model=cfg.name, router_bias=bias is not None, seq_len=seq_len,
                      data=data, tokens=tokens, specialization=domains)
        labels = [f"layer {i}" for i in ids]
    else:
        labels = None

    where = labels[worst] if labels else f"MoE layer {worst}"
    title = (f"{workdir.name}: expert share per layer, steps {steps[0]}-{steps[-1]} ({len(steps)} logged)\n"
             f"worst-layer load {loads_L[worst]:.2f} ({where}; 1 = uniform, {load_LE.shape[1]} = one expert)")
    if domains is not None:
        title += f"\nspecialization (mean JS {' vs '.join(domains['domains'])}) {domains['score']:.3f}"
    er.plot_load_heatmap(load_LE, out, title=title, layer_labels=labels)
    json_path = er.write_json(out.with_suffix(".json"), report)
    print(f"expert load over steps {steps[0]}-{steps[-1]}: per layer " +
          " ".join(f"{x:.2f}" for x in loads_L) + f" (worst {loads_L[worst]:.2f}, MoE layer {worst})")
    if domains is not None:
        print(f"routing on {', '.join(f'{k} {v:,}' for k, v in report['tokens'].items())} held-out tokens "
              f"(checkpoint step {report['step']}{', with the aux-free router bias' if report['router_bias'] else ''}):")
        print(er.format_table(domains))
    print(f"wrote {out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
