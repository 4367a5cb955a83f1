"""The held-out split: train and heldout documents are disjoint and together the whole dataset."""

import numpy as np

from data_pipeline.pipeline import DatasetSpec, doc_lengths, make_dataset


def _docs(spec, n_batches=400):
    it = make_dataset(spec, seq_len=1024, global_batch_size=4, num_epochs=1, shuffle=False, with_ids=True,
                      process_index=0, process_count=1)
    seen = set()
    for _ in range(n_batches):
        try:
            b = next(it)
        except StopIteration:
            break
        seen |= set(np.unique(b["doc_ids"]).tolist())
    seen.discard(-1)
    return seen


def test_train_and_heldout_are_disjoint_and_cover_the_dataset(stdlib_data):
    path = stdlib_data["docs"]
    n = len(doc_lengths(path))
    train = _docs(DatasetSpec(path=path, split="train", heldout_fraction=0.05), n_batches=10**6)
    held = _docs(DatasetSpec(path=path, split="heldout", heldout_fraction=0.05), n_batches=10**6)
    assert train.isdisjoint(held)
    assert train | held == set(range(n))
    assert 0.02 * n < len(held) < 0.08 * n
