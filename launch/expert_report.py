"""Expert load and per-domain specialization of an MoE training run.

  python launch/expert_report.py WORKDIR [--last N] [--out PNG] [--data NAME=DIR ...] [--tokens T]
  python launch/expert_report.py runs/demo      # a folder of runs (the demo's stages): one report per run

Writes a heatmap (MoE layers × experts: each cell the expert's share of that layer's assignments,
summed over the last N logged steps of WORKDIR/metrics.jsonl; the title names the worst layer's
load = largest share × E), then runs the latest checkpoint's model forward on up to T held-out
tokens of each dataset and prints, per layer, each domain's top experts and the Jensen-Shannon
divergence (bits, in [0, 1]) between the domains' routing: the specialization score. Everything
also goes to a JSON file next to the PNG (same name, .json).

Without --data the datasets are the ones the run trained on, read from WORKDIR/config.gin
(`stage_mixture.*`); on the built-in corpus that is its `code` and `docs` folders (every non-code
mixture name reads docs). --skip_domains writes the heatmap only. Definitions:
qwen3_jax/expert_report.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import gin

from data_pipeline.prepare import parse_named_datasets
from qwen3_jax import configurables, storage
from qwen3_jax import expert_report as er
from qwen3_jax.errors import ReportError


def _data_from_config(workdir) -> tuple[dict[str, str], float]:
    """({domain: folder}, heldout_fraction) of the run's `stage_mixture` bindings; several mixture
    names reading one folder (the built-in corpus) become one domain named after the folder."""
    for name in ("config.gin", "operative_config.gin"):
        if (workdir / name).is_file():
            gin_file = workdir / name
            break
    else:
        raise ValueError(f"{workdir} has no config.gin or operative_config.gin: pass --data NAME=DIR")
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
    p.add_argument("workdir", help="training workdir (metrics.jsonl, checkpoints/), or a folder of them")
    p.add_argument("--last", type=int, default=50, help="logged steps summed in the heatmap (default 50)")
    p.add_argument("--out", default=None, help="heatmap PNG (default RUN/expert_load.png for each run); JSON beside it")
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

    def fail(msg: str) -> int:
        print(f"expert_report.py: error: {msg}", file=sys.stderr)
        return 2

    for flag in ("tokens", "batch_size", "last") + (("seq_len",) if args.seq_len is not None else ()):
        if getattr(args, flag) <= 0:
            return fail(f"--{flag} {getattr(args, flag)}: must be > 0")
    if not workdir.is_dir():
        return fail(f"workdir {workdir} does not exist")
    runs = run_folders(workdir)
    if not runs:
        return fail(f"{workdir} has no metrics.jsonl, and no run folder inside it has one (a training workdir, "
                    f"or a folder of them such as runs/demo)")
    if args.out and len(runs) > 1:
        return fail(f"--out names one PNG but {workdir} holds {len(runs)} runs ({', '.join(r.name for r in runs)}): "
                    f"drop --out (each run gets RUN/expert_load.png) or name one run")
    for run in runs:
        out = storage.path(args.out) if args.out else run / "expert_load.png"
        if not storage.is_remote(out) and not out.parent.is_dir():  # an object store has no folders to create
            return fail(f"--out {out}: folder {out.parent} does not exist")
        if len(runs) > 1:
            print(f"=== {run} ===", flush=True)
        try:
            report = er.load_report(run, args.last)
            if not args.skip_domains:
                data, hf = parse_named_datasets(args.data), args.heldout_fraction
                if not data:
                    data, run_hf = _data_from_config(run)
                    hf = run_hf if hf is None else hf
                er.add_domains(report, data, tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                               split=args.split, heldout_fraction=0.02 if hf is None else hf, step=args.step,
                               router_bias=not args.no_router_bias)
        except (ReportError, FileNotFoundError, ValueError) as e:
            return fail(str(e))
        png, json_path = er.write_report(report, out)
        print(er.summary(report))
        print(f"wrote {png} and {json_path}")
    return 0


def run_folders(workdir) -> list:
    """The runs under `workdir`: itself when it holds metrics.jsonl, else its subfolders that do
    (the demo's runs/demo/stage1..3), in name order."""
    if (workdir / "metrics.jsonl").is_file():
        return [workdir]
    return sorted((d for d in workdir.iterdir() if d.is_dir() and (d / "metrics.jsonl").is_file()),
                  key=lambda d: d.name)


if __name__ == "__main__":
    sys.exit(main())
