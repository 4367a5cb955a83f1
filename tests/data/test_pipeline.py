"""Pipeline: every token exactly once (1, 2, 4 hosts), segment ids/positions, exact resume, mixture shares."""
import json
import os

import numpy as np
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource

from data_pipeline.pipeline import DatasetSpec, LengthBuckets, Mixture, doc_lengths, make_dataset


def _docs(path):
    st = json.load(open(os.path.join(path, "stats.json")))
    src = ArrayRecordDataSource([os.path.join(path, s) for s in st["shards"]])
    return [np.frombuffer(src[i], st["dtype"]).astype(np.int32) for i in range(len(src))]


def _segments(batch):
    """(row, start, stop) of every segment."""
    out = []
    for r, seg in enumerate(batch["segment_ids"]):
        cuts = np.flatnonzero(np.diff(seg)) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(seg)]):
            if seg[a] > 0:
                out.append((r, a, b))
    return out


def _check_batch(b, B, T, split_positions="restart"):
    """Shapes, dtypes, segment ids, positions, targets and loss mask at every boundary."""
    assert {k: (v.shape, v.dtype.name) for k, v in b.items() if k in ("tokens", "targets", "segment_ids",
            "positions", "loss_mask")} == {"tokens": ((B, T), "int32"), "targets": ((B, T), "int32"),
            "segment_ids": ((B, T), "int32"), "positions": ((B, T), "int32"), "loss_mask": ((B, T), "float32")}
    seg, pos, tok = b["segment_ids"], b["positions"], b["tokens"]
    for r in range(B):
        s = seg[r]
        nz = s > 0
        if nz.any():  # ids are 1, 2, 3, … in order; padding only after the last document
            assert s[0] == 1 and set(np.diff(s[nz]).tolist()) <= {0, 1}
            assert not nz[np.argmin(nz):].any() if not nz.all() else True
    for r, a, c in _segments(b):
        assert (b["doc_ids"][r, a:c] == b["doc_ids"][r, a]).all()  # one document per segment
        assert (np.diff(pos[r, a:c]) == 1).all()
        if split_positions == "restart":
            assert pos[r, a] == 0
        lm = b["loss_mask"][r, a:c]
        assert (lm[:-1] == 1).all() and lm[-1] == 0  # no target across a document boundary
        assert (b["targets"][r, a:c - 1] == tok[r, a + 1:c]).all()
    pad = seg == 0
    assert (b["loss_mask"][pad] == 0).all() and (tok[pad] == 0).all() and (b["doc_ids"][pad] == -1).all()


@pytest.mark.parametrize("packing,split_positions,hosts,shards,workers", [
    ("concat_split", "restart", 1, None, 0), ("concat_split", "restart", 2, None, 0),
    ("concat_split", "continue", 4, None, 0), ("first_fit", "continue", 1, None, 0),
    ("first_fit", "continue", 2, None, 0), ("best_fit", "restart", 4, None, 0),
    ("concat_split", "continue", 1, 3, 0), ("first_fit", "restart", 2, 4, 0),  # several shards per host
    ("first_fit", "continue", 2, 2, 2)])  # grain worker processes (mp_prefetch) per shard
def test_one_epoch_every_token_exactly_once(stdlib_data, packing, split_positions, hosts, shards, workers):
    path, T, B = stdlib_data["docs"], 512, 4 * hosts * (shards or 1)
    docs = _docs(path)
    seen = {}  # doc → list of (host, order, position offset, tokens)
    split_starts = []
    for h in range(hosts):
        it = make_dataset(path, seq_len=T, global_batch_size=B, num_epochs=1, packing=packing, data_shards=shards,
                          split_positions=split_positions, process_index=h, process_count=hosts, with_ids=True,
                          worker_count=workers)
        n = 0
        for b in it:
            _check_batch(b, B // hosts, T, split_positions)
            for r, a, c in _segments(b):
                d = int(b["doc_ids"][r, a])
                seen.setdefault(d, []).append((h, n, int(b["positions"][r, a]), b["tokens"][r, a:c]))
                n += 1
    assert sorted(seen) == list(range(len(docs)))  # union of hosts = the corpus
    for d, pieces in seen.items():
        assert len({h for h, *_ in pieces}) == 1  # hosts disjoint: a document lives on one host
        if split_positions == "continue":  # positions give each piece's offset in its document
            pieces = sorted(pieces, key=lambda p: p[2])
            assert [p[2] for p in pieces] == list(np.cumsum([0] + [len(p[3]) for p in pieces[:-1]]))
            if len(pieces) > 1:
                split_starts.append(pieces[1][2])
        elif packing == "concat_split":
            pieces = sorted(pieces, key=lambda p: p[1])  # pieces come in order
        else:
            assert len(pieces) == 1 or all(p[2] == 0 for p in pieces)
            # restart mode: where each piece sat in its document is not recorded, but the pieces
            # must be exactly the document's seq_len-sized chunks (compared as a multiset)
            chunks = [docs[d][i:i + T] for i in range(0, len(docs[d]), T)]
            assert sorted(p[3].tobytes() for p in pieces) == sorted(c.tobytes() for c in chunks)
            continue
        np.testing.assert_array_equal(np.concatenate([p[3] for p in pieces]), docs[d])  # each token once
    if split_positions == "continue":
        assert split_starts and min(split_starts) > 0  # split documents continue their positions


def test_epochs_reshuffle(stdlib_data):
    it = make_dataset(stdlib_data["docs"], seq_len=1024, global_batch_size=2, num_epochs=2, process_index=0,
                      split_positions="continue",
                      process_count=1, with_ids=True)
    order = []
    for b in it:
        for r, a, c in _segments(b):
            if b["positions"][r, a] == 0:
                order.append(int(b["doc_ids"][r, a]))
    n = len(_docs(stdlib_data["docs"]))
    assert len(order) == 2 * n and sorted(order) == sorted(list(range(n)) * 2)
    assert order[:n] != order[n:] and sorted(order[:n]) == list(range(n))


def _resume_equal(make, k, n):
    """Batches k..k+n of one iterator (its state taken after batch k) == a new iterator's first n
    after set_state(that state). Returns the state."""
    full = make()
    want = [next(full) for _ in range(k)]
    state = json.loads(json.dumps(full.get_state()))  # must survive JSON (how it is checkpointed)
    assert len(json.dumps(state)) < 4000
    want += [next(full) for _ in range(n)]
    second = make()
    second.set_state(state)
    got = [next(second) for _ in range(n)]
    for a, b in zip(want[k:], got):
        assert a.keys() == b.keys() and all(np.array_equal(a[x], b[x]) for x in a)
    return state


@pytest.mark.parametrize("packing", ["concat_split", "first_fit"])
def test_resume_mixture(stdlib_data, packing):
    mix = Mixture(weights={"code": 0.7, "docs": 0.3}, paths=stdlib_data)
    make = lambda: make_dataset(mix, seq_len=1024, global_batch_size=8, packing=packing, seed=3,  # noqa: E731
                                process_index=1, process_count=2, with_ids=True)
    _resume_equal(make, 7, 5)
    with pytest.raises(ValueError, match="differently configured .*seed: 3 -> 4"):
        make_dataset(mix, seq_len=1024, global_batch_size=8, packing=packing, seed=4, process_index=1,
                     process_count=2, with_ids=True).set_state(make().get_state())


def test_resume_with_worker_processes(stdlib_data):
    """grain mp_prefetch workers (each packs its own slice of the shard's documents, so the
    batches differ from worker_count=0): the position resumes exactly with the same worker
    count, and a resume with another one is refused rather than replaying other batches."""
    mix = Mixture(weights={"code": 0.7, "docs": 0.3}, paths=stdlib_data)
    make = lambda w=2: make_dataset(mix, seq_len=1024, global_batch_size=8, packing="first_fit",  # noqa: E731
                                    seed=3, data_shards=2, worker_count=w, with_ids=True)
    state = _resume_equal(make, 3, 3)
    with pytest.raises(ValueError, match=r"differently configured .*worker_count: 2 -> 0"):
        make(0).set_state(state)


def test_resume_stage3_length_buckets(stdlib_data, tmp_path):
    from etils import epath
    buckets = LengthBuckets(source=Mixture(weights={"code": 0.8, "docs": 0.2}, paths=stdlib_data))
    make = lambda: make_dataset(buckets, seq_len=32768, global_batch_size=2, packing="first_fit",  # noqa: E731
                                process_index=0, process_count=1, with_ids=True)
    _resume_equal(make, 3, 3)
    # the orbax path: our handler writes one JSON file per data shard, and restores it
    from data_pipeline.data_state import DataRestore, DataSave, DataStateHandler
    it = make()
    for _ in range(2):
        next(it)
    DataStateHandler().save(epath.Path(tmp_path), DataSave(it))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00000-of-00001.json"]
    want = next(it)
    it2 = DataStateHandler().restore(epath.Path(tmp_path), DataRestore(make()))
    assert all(np.array_equal(want[k], v) for k, v in next(it2).items())
    other = make_dataset(buckets, seq_len=16384, global_batch_size=2, packing="first_fit", with_ids=True)
    with pytest.raises(ValueError, match=r"shard_00000-of-00001.json: .*seq_len: 32768 -> 16384"):
        DataStateHandler().restore(epath.Path(tmp_path), DataRestore(other))


@pytest.mark.parametrize("packing", ["concat_split", "first_fit"])
def test_data_shards_make_the_batch_independent_of_process_count(stdlib_data, tmp_path, packing):
    """With data_shards=4 the global batch is the same on 1, 2 or 4 processes, and a position saved
    by 2 processes restores on 1 or 4 (one state file per shard)."""
    from etils import epath

    from data_pipeline.data_state import DataRestore, DataSave, DataStateHandler
    mix = Mixture(weights={"code": 0.7, "docs": 0.3}, paths=stdlib_data)

    def make(p, n):
        return make_dataset(mix, seq_len=512, global_batch_size=8, packing=packing, seed=5, process_index=p,
                            process_count=n, data_shards=4, with_ids=True)

    def global_batches(n, k, its=None):
        its = its or [make(p, n) for p in range(n)]
        out = [{key: np.concatenate([b[key] for b in bs]) for key in bs[0]}
               for bs in ([next(it) for it in its] for _ in range(k))]
        return out, its

    want, _ = global_batches(1, 6)
    for n in (2, 4):
        got, _ = global_batches(n, 6)
        for a, b in zip(want, got):
            assert all(np.array_equal(a[k], b[k]) for k in a)
    # 2 processes run 3 steps and save; 1 and 4 processes resume from the same files
    _, its = global_batches(2, 3)
    for it in its:
        DataStateHandler().save(epath.Path(tmp_path), DataSave(it))
    assert len(list(tmp_path.glob("shard_*-of-00004.json"))) == 4
    for n in (1, 4):
        its = [DataStateHandler().restore(epath.Path(tmp_path), DataRestore(make(p, n))) for p in range(n)]
        got, _ = global_batches(n, 3, its)
        for a, b in zip(want[3:], got):
            assert all(np.array_equal(a[k], b[k]) for k in a)
    # shards are disjoint: no document appears in two shards' rows of one batch
    b = want[0]
    rows = 8 // 4
    docs = [set(b["doc_ids"][s * rows:(s + 1) * rows][b["dataset_ids"][s * rows:(s + 1) * rows] == 0].tolist())
            for s in range(4)]
    assert all(not (docs[i] & docs[j]) for i in range(4) for j in range(i + 1, 4))
    # another shard count is refused with the file it looked for
    other = make_dataset(mix, seq_len=512, global_batch_size=8, packing=packing, seed=5, process_index=0,
                         process_count=1, data_shards=2, with_ids=True)
    with pytest.raises(ValueError, match="shard_00000-of-00002.json does not exist"):
        DataStateHandler().restore(epath.Path(tmp_path), DataRestore(other))


def test_data_shards_errors(stdlib_data):
    with pytest.raises(ValueError, match="data_shards=3 is not a multiple of the 2 processes"):
        make_dataset(stdlib_data["code"], seq_len=64, global_batch_size=6, process_index=0, process_count=2,
                     data_shards=3)
    with pytest.raises(ValueError, match="not divisible by 4 data shards"):
        make_dataset(stdlib_data["code"], seq_len=64, global_batch_size=6, process_index=0, process_count=1,
                     data_shards=4)


def test_mixture_proportions(stdlib_data):
    mix = Mixture(weights={"code": 0.7, "docs": 0.3}, paths=stdlib_data)
    for packing, tol in (("concat_split", 0.02), ("first_fit", 0.05)):
        it = make_dataset(mix, seq_len=1024, global_batch_size=8, packing=packing, process_index=0,
                          process_count=1, with_ids=True)
        ids = np.concatenate([next(it)["dataset_ids"].ravel() for _ in range(60)])
        real = ids[ids >= 0]
        share = (real == [s.key for s in it.specs].index("code")).mean()
        assert abs(share - 0.7) < tol, (packing, share)
        assert len(real) / len(ids) > (0.99 if packing == "concat_split" else 0.9)


def test_length_bucket_proportions(stdlib_data):
    """Stage 3: 75% of tokens from 16K–32K-token documents, 25% from 4K–16K (±5% over 40 rows)."""
    src = Mixture(weights={"code": 0.8, "docs": 0.2}, paths=stdlib_data)
    it = make_dataset(LengthBuckets(source=src), seq_len=32768, global_batch_size=2, packing="first_fit",
                      process_index=0, process_count=1, with_ids=True)
    lengths = {s.key: doc_lengths(s.path) for s in it.specs}
    long_tokens = total = 0
    for _ in range(20):
        b = next(it)
        for r, a, c in _segments(b):
            spec = it.specs[int(b["dataset_ids"][r, a])]
            n = lengths[spec.key][int(b["doc_ids"][r, a])]
            lo, hi = spec.length_range
            assert lo < n <= hi  # each document comes from its bucket
            total += c - a
            long_tokens += (c - a) * (n > 16384)
    assert abs(long_tokens / total - 0.75) < 0.05, long_tokens / total


def test_dataset_spec_and_errors(stdlib_data):
    with pytest.raises(ValueError, match="num_epochs=None"):
        make_dataset(Mixture(weights={"code": 1, "docs": 1}, paths=stdlib_data), seq_len=64,
                     global_batch_size=2, num_epochs=1, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="divisible"):
        make_dataset(stdlib_data["code"], seq_len=64, global_batch_size=3, process_index=0, process_count=2)
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        make_dataset(DatasetSpec(path="/nonexistent"), seq_len=64, global_batch_size=2, process_index=0,
                     process_count=1)
