"""Look at the data before spending a pod on it: stats + a few packed batches decoded to text.

    python launch/inspect_data.py runs/data/code --tokenizer qwen3 --seq-len 4096 --batches 1
    python launch/inspect_data.py --gin stage3.gin --gin_param DATA_ROOT="'data'" --tokenizer qwen3

With --gin (the training command's gin files and bindings) it shows the batches that training
run would read: the stage's mixture, length buckets, packing and SEQ_LEN.

Document boundaries inside a row are marked ⟦doc D of dataset, pos P⟧ … ⟦/⟧, padding as ⟦pad ×N⟧.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from data_pipeline.cli import ArgumentParser
from data_pipeline.inspect_data import format_row, format_stats
from data_pipeline.pipeline import Mixture, make_dataset, resolve
from data_pipeline.text_tokenizer import load_tokenizer
from qwen3_jax import configurables
from qwen3_jax.errors import TrainingError


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="*", help="prepared dataset folder(s) (mixed with equal weights)")
    configurables.add_gin_flags(p, "the training command's gin file(s)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer used by prepare.py, to decode")
    p.add_argument("--seq-len", type=int, default=4096, help="without --gin (with it: SEQ_LEN)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--batches", type=int, default=1)
    p.add_argument("--packing", default="concat_split")
    p.add_argument("--max-chars", type=int, default=600, help="per document piece (middle elided)")
    a = p.parse_args(argv)
    if not a.gin and not a.data:
        p.error("give dataset folders or --gin")
    try:
        return _inspect(a)
    except (OSError, ValueError) as e:  # ShardError, a missing stats.json, a bad folder: one line naming it
        print(f"inspect_data.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:  # the gin files
        print(f"inspect_data.py: error: bad configuration: {e}", file=sys.stderr)
        return 2


def _inspect(a: argparse.Namespace) -> int:
    tok = load_tokenizer(a.tokenizer)
    kw = dict(process_index=0, process_count=1, with_ids=True)
    if a.gin:
        _, tc = configurables.read_run(a.gin, a.gin_param)
        it = tc.make_data(seq_len=tc.seq_len, global_batch_size=a.batch_size, seed=tc.seed, **kw)
    else:
        data = a.data[0] if len(a.data) == 1 else Mixture(paths={d.rstrip("/").split("/")[-1]: d for d in a.data},
                                                          weights={d.rstrip("/").split("/")[-1]: 1 for d in a.data})
        it = make_dataset(data, seq_len=a.seq_len, global_batch_size=a.batch_size, packing=a.packing, **kw)
    for path in sorted({s.path for s in resolve(it.specs)}):
        print(format_stats(path), "\n")
    for k in range(a.batches):
        b = next(it)
        real = b["segment_ids"] > 0
        print(f"=== batch {k}: {b['tokens'].shape}, {real.mean():.1%} non-padding, "
              f"{int(b['loss_mask'].sum()):,} loss tokens ===")
        for r in range(b["tokens"].shape[0]):
            print(f"--- row {r} ---")
            print(format_row(b, r, tok, it.specs, a.max_chars))
    it.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
