"""Parameter counts of a preset, from the model's own abstract parameter shapes.

  python launch/model_info.py --model qwen3-235b-a22b [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from qwen3_jax.config import PRESETS
from qwen3_jax.params import count_params


def main(argv=None) -> int:

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    if args.model not in PRESETS:
        print(f"error: unknown model {args.model!r}; known: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    cfg = PRESETS[args.model]
    counts = count_params(cfg)
    if args.json:
        print(json.dumps({"model": args.model, **counts}))
        return 0
    print(f"{args.model}: {cfg.num_layers} layers, d_model {cfg.d_model}, heads {cfg.num_heads}/{cfg.num_kv_heads}"
          + (f", {cfg.num_experts} experts (top-{cfg.num_experts_per_tok})" if cfg.is_moe else ""))
    for key, n in counts.items():
        print(f"  {key:22s} {n:>18,d}  ({n / 1e9:.3f}B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
