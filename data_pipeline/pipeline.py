"""Prepared ArrayRecord shards → packed, per-host numpy batches (grain), and global jax.Arrays.

Per dataset (one `DatasetSpec`: a folder written by prepare.py, optionally a document-length range):

  ArrayRecordDataSource (+ length-range subset from the shards' lengths.npy)
    → parse (uint16/uint32 bytes → int32 tokens)            grain map_with_index
    → shuffle(seed), reshuffled every epoch                 grain MapDataset.shuffle
    → one data shard's share: shuffled[shard::data_shards]  grain slice (a host reads only its shards' records)
    → repeat(num_epochs)                                    grain repeat (None = forever)
    → read-ahead threads                                    grain to_iter_dataset(ReadOptions)
    → pack to seq_len with segment ids + positions          grain ConcatThenSplit / FirstFit / BestFit
                                                            (longer documents are split, never dropped)
Then datasets are mixed by weight *as packed rows*, so a weight is a fraction of the token budget
(grain IterDataset.mix: a deterministic interleave, exact proportions), batched to the shard's
rows, and turned into the training batch (targets, loss mask) in numpy. The transforms live in
`data_pipeline.transforms`.

Response datasets (stats.json "loss_on": "response", written by launch/make_responses.py, with
each document's prompt length in shard-….prompt_lengths.npy): when a run reads one, every
document carries a per-token response flag through the packers (all ones for plain datasets) and
the loss mask scores position t only when its target, token t+1, is a response token. The batch
keys and dtypes stay the same; runs without a response dataset are unchanged (same features,
grain state and fingerprint).

Data shards: the global batch is `data_shards` independent pipelines (default: one per process),
each giving global_batch_size / data_shards rows; a process runs the shards it owns
(shard s belongs to process s * process_count // data_shards) and concatenates their rows. The
global batch is therefore the same for any process count that divides `data_shards`, and so is
the saved position: `DataIterator.get_state()` holds each owned shard's grain state (small, JSON),
and `data_pipeline.data_state` writes one file per shard, so a run checkpointed on 2 hosts can
resume on 1 or 4 (with data_shards=4). A thread prefetches the next batches.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from data_pipeline.shards import ShardSource, load_npy
from data_pipeline.transforms import BATCH_DTYPES, BATCH_KEYS, Finish, Parse, Row, SplitLong, fix_json_state  # noqa: F401  (re-exported: their home is transforms)
from qwen3_jax import storage

PACKERS = ("concat_split", "first_fit", "best_fit")
SPLIT_POSITIONS = ("restart", "continue")


# --- what to read --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A prepared dataset folder; weight = share of packed tokens; length_range = (lo, hi]: keep
    only documents with lo < length <= hi tokens (length counts the <|endoftext|> separator)."""
    path: str
    name: str | None = None
    weight: float = 1.0
    length_range: tuple[int, int] | None = None
    # Held-out split: a fixed pseudo-random `heldout_fraction` of the documents (by index) is
    # "heldout"; split="train" reads the rest, split="heldout" only those, None everything.
    split: str | None = None
    heldout_fraction: float = 0.0

    @property
    def key(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.path))


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Named datasets with weights (fractions of packed tokens; normalised).

    Either `weights={'web': .5, 'code': .3, …}` with each name a folder under `root` (or given
    in `paths`), or explicit `datasets=[DatasetSpec(...), …]`.
    """
    weights: Mapping[str, float] | None = None
    root: str | None = None
    paths: Mapping[str, str] | None = None
    datasets: Sequence[DatasetSpec] = ()

    def specs(self) -> list[DatasetSpec]:
        out = list(self.datasets)
        for name, w in (self.weights or {}).items():
            path = (self.paths or {}).get(name) or os.path.join(self.root or ".", name)
            out.append(DatasetSpec(path=path, name=name, weight=float(w)))
        if not out:
            raise ValueError("empty Mixture")
        return out


@dataclasses.dataclass(frozen=True)
class LengthBuckets:
    """Views of `source` by document length with token shares, e.g. Qwen3 stage 3:
    75% of tokens from 16K–32K-token documents, 25% from 4K–16K (`buckets`: (lo, hi, weight)
    with lo < length <= hi). Inside a bucket the source's own weights split the share."""
    source: Any = None  # Mixture | DatasetSpec | path
    buckets: Sequence[tuple[int, int, float]] = ((16384, 32768, 0.75), (4096, 16384, 0.25))

    def specs(self) -> list[DatasetSpec]:
        out = []
        for lo, hi, bw in self.buckets:
            comps = [s for s in resolve(self.source) if _count_in_range(s.path, (lo, hi)) > 0]
            if not comps:
                raise ValueError(f"no document of {lo} < length <= {hi} tokens in {self.source}")
            total = sum(s.weight for s in comps)
            out += [dataclasses.replace(s, name=f"{s.key}[{lo}:{hi}]", length_range=(lo, hi),
                                        weight=bw * s.weight / total) for s in comps]
        return out


def resolve(data) -> list[DatasetSpec]:
    """str | DatasetSpec | Mixture | LengthBuckets (or a list of these) → dataset specs."""
    if isinstance(data, str):
        return [DatasetSpec(path=data)]
    if isinstance(data, DatasetSpec):
        return [data]
    if isinstance(data, (Mixture, LengthBuckets)):
        return data.specs()
    if isinstance(data, (list, tuple)):
        return [s for d in data for s in resolve(d)]
    raise TypeError(f"cannot read data from {data!r}")


def load_stats(path: str) -> dict:
    """stats.json of the prepared dataset at `path` (a local folder or a bucket prefix)."""
    f = os.path.join(path, "stats.json")
    if not storage.path(f).exists():
        raise FileNotFoundError(f"{path} is not a complete prepared dataset (no stats.json); run prepare.py")
    try:
        return json.loads(storage.path(f).read_text())
    except ValueError as e:
        raise ValueError(f"{f}: not valid JSON ({e}); delete it, re-run prepare.py (same arguments)") from None


def doc_lengths(path: str) -> np.ndarray:
    """Lengths (tokens incl. separator) of all documents of a prepared dataset, in record order."""
    st = load_stats(path)
    return np.concatenate([load_npy(os.path.join(path, s.replace(".array_record", ".lengths.npy")))
                           for s in st["shards"]]).astype(np.int64)


def _loss_on(path: str) -> str | None:
    """None (every token is a target) or "response" (a response dataset: only its response tokens)."""
    v = load_stats(path).get("loss_on")
    if v not in (None, "response"):
        raise ValueError(f"{os.path.join(path, 'stats.json')}: loss_on={v!r} is not 'response' (or absent)")
    return v


def _count_in_range(path: str, rng) -> int:
    n = doc_lengths(path)
    return int(((n > rng[0]) & (n <= rng[1])).sum())


# --- grain pieces ----------------------------------------------------------------------------
class _Subset:
    """Random-access view of the records at `indices` (a length bucket)."""

    def __init__(self, source, indices: np.ndarray):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        return self._source[int(self._indices[i])]

    def __getitems__(self, ii):
        return self._source.__getitems__([int(self._indices[i]) for i in ii])


class DataIterator(grain.DatasetIterator):
    """Yields per-host batches (dict of numpy arrays, see data_pipeline's docstring).

    get_state() → small JSON-serialisable dict; set_state(state) resumes exactly there. Being a
    grain DatasetIterator it also works with grain.checkpoint.CheckpointSave/CheckpointRestore
    (one JSON file per process) inside an orbax args.Composite.
    """

    def __init__(self, inner: grain.DatasetIterator, fingerprint: str, specs: list[DatasetSpec],
                 batch_size: int, seq_len: int, shard_ids: Sequence[int], data_shards: int,
                 settings: dict | None = None):
        super().__init__(inner)
        self.fingerprint, self.specs, self.settings = fingerprint, specs, settings or {}
        self.per_host_batch_size, self.seq_len = batch_size, seq_len
        self.shard_ids, self.data_shards = list(shard_ids), data_shards

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict:
        """{"fingerprint", "data_shards", "shards": {"<shard id>": grain state}} for the owned shards."""
        return {"fingerprint": self.fingerprint, "data_shards": self.data_shards, "settings": self.settings,
                "shards": json.loads(json.dumps(self._parent.get_state()))}

    def mismatch(self, fingerprint: str | None, settings: dict | None) -> str:
        """The error for a saved position of another pipeline, naming the settings that differ
        (saved -> now) when the position recorded them."""
        saved = settings or {}  # positions saved before settings were recorded name nothing
        diff = [f"{k}: {saved.get(k)!r} -> {self.settings.get(k)!r}" for k in sorted(set(saved) | set(self.settings))
                if saved and saved.get(k) != self.settings.get(k)]
        return (f"data state was saved by a differently configured pipeline ({fingerprint} != {self.fingerprint}"
                + (f"; {', '.join(diff)}" if diff else "") + ")")

    def set_state(self, state: dict) -> None:
        """Resumes from get_state() of an identically configured pipeline; the state may come from
        another process count (it must hold this process's shards, e.g. merged shard files)."""
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(self.mismatch(state.get("fingerprint"), state.get("settings")))
        shards = state.get("shards", {})
        missing = [s for s in self.shard_ids if str(s) not in shards]
        if missing:
            raise ValueError(f"data state has no position for data shard(s) {missing} of {self.data_shards}")
        self._parent.set_state({str(s): fix_json_state(shards[str(s)]) for s in self.shard_ids})


class _ConcatShards(grain.IterDataset):
    """Several data shards' batches → one batch (rows concatenated in shard order)."""

    def __init__(self, parents: Sequence[grain.IterDataset], shard_ids: Sequence[int]):
        super().__init__(list(parents))
        self._ids = [str(s) for s in shard_ids]

    def __iter__(self):
        return _ConcatShardsIterator([p.__iter__() for p in self.parents], self._ids)


class _ConcatShardsIterator(grain.DatasetIterator):
    def __init__(self, parents, ids):
        super().__init__(parents)
        self._ids = ids
        self._empty = None  # a padding batch for a shard that ran out (finite epochs)

    def __next__(self):
        out, live = [], False
        for p in self._parents:
            try:
                b = next(p)
                live = True
                if self._empty is None:
                    self._empty = {k: np.full_like(v, -1 if k in ("doc_ids", "dataset_ids") else 0)
                                   for k, v in b.items()}
            except StopIteration:
                b = None
            out.append(b)
        if not live:
            raise StopIteration
        out = [self._empty if b is None else b for b in out]
        return out[0] if len(out) == 1 else {k: np.concatenate([b[k] for b in out]) for k in out[0]}

    def get_state(self):
        return {i: p.get_state() for i, p in zip(self._ids, self._parents)}

    def set_state(self, state):
        for i, p in zip(self._ids, self._parents):
            p.set_state(state[i])


def _seed_for(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 32)


def _selected(spec: DatasetSpec) -> np.ndarray | None:
    """Boolean mask over the dataset's documents for its length range and split (None = all)."""
    if spec.length_range is None and spec.split is None:
        return None
    n = doc_lengths(spec.path)
    keep = np.ones(len(n), bool)
    if spec.length_range is not None:
        lo, hi = spec.length_range
        keep &= (n > lo) & (n <= hi)
    if spec.split is not None:
        if spec.split not in ("train", "heldout"):
            raise ValueError(f"{spec.key}: split={spec.split!r} is not 'train', 'heldout' or None")
        bucket = (np.arange(len(n), dtype=np.uint64) * np.uint64(2654435761) % np.uint64(1 << 32)) / float(1 << 32)
        heldout = bucket < spec.heldout_fraction
        keep &= heldout if spec.split == "heldout" else ~heldout
    return keep


def _documents(spec: DatasetSpec, dataset_id: int, *, seed, shuffle, num_epochs, shard, data_shards,
               split_positions, read_threads, with_ids, loss_on=None, **unused):
    """One data shard's documents of one dataset, shuffled per epoch → (IterDataset, mean length)."""
    st = load_stats(spec.path)
    source = ShardSource(spec.path, st)  # checks the shards against stats.json; read errors name the file
    lengths, index_map, source_prompt_lengths = source.lengths, None, source.prompt_lengths
    keep = _selected(spec)
    if keep is not None:
        index_map = np.nonzero(keep)[0]
        source = _Subset(source, index_map)
    if len(source) < data_shards:
        raise ValueError(f"{spec.key}: {len(source)} documents cannot be shared by {data_shards} data shards")
    continue_pos = split_positions == "continue"
    mean_len = float(np.mean(lengths[index_map] if index_map is not None else lengths))
    ds = grain.MapDataset.source(source).map_with_index(
        Parse(st["dtype"], len(source), index_map, continue_pos, with_ids, dataset_id,
              prompt_lengths=source_prompt_lengths, masked=loss_on == "response"))
    if shuffle:
        ds = ds.shuffle(seed=_seed_for(seed, spec.key))
    ds = ds[shard::data_shards]
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64)), mean_len


def _pack(it, *, seq_len, seed, shuffle, packing, split_positions, num_packing_bins, with_ids, key, shard,
          loss_on=None, **unused):
    """Documents → rows of seq_len tokens with segment ids and positions (grain packers)."""
    continue_pos, masked = split_positions == "continue", loss_on == "response"
    feats = ["tokens"] + ["pos"] * continue_pos + ["doc", "src"] * with_ids + ["resp"] * masked
    lengths = {f: seq_len for f in feats}
    if packing == "concat_split":
        packed = grain.experimental.ConcatThenSplitIterDataset(it, length_struct=lengths)
    else:
        it = grain.experimental.FlatMapIterDataset(it, SplitLong(seq_len))
        cls = (grain.experimental.FirstFitPackIterDataset if packing == "first_fit"
               else grain.experimental.BestFitPackIterDataset)
        packed = cls(it, length_struct=lengths, num_packing_bins=num_packing_bins,
                     seed=_seed_for(seed + 1, f"{key}#{shard}"), shuffle_bins=shuffle)
    return packed.map(Row(continue_pos, with_ids, masked))


def make_dataset(data, *, seq_len: int, global_batch_size: int,
                 seed: int = 0, num_epochs: int | None = None, shuffle: bool = True,
                 packing: str = "concat_split", split_positions: str = "restart", num_packing_bins: int = 0,
                 process_index: int | None = None, process_count: int | None = None, data_shards: int | None = None,
                 read_threads: int = 2, prefetch_batches: int = 2, worker_count: int = 0, with_ids: bool = False,
                 mix: str = "auto") -> DataIterator:
    """Builds this host's batch iterator (see data_pipeline's docstring for the batch format).

    data: a prepared folder, DatasetSpec, Mixture or LengthBuckets (or a list of these).
    num_epochs: None = repeat forever (training; needed for mixtures); 1 = one pass, the last batch
      padded with empty rows (every token exactly once). Each epoch is shuffled differently.
    packing: "concat_split" (grain ConcatThenSplit: ~100% full rows, documents cross row ends) or
      "first_fit" / "best_fit" (grain bin packers, documents stay whole unless longer than seq_len;
      num_packing_bins defaults to 4 × the shard's rows).
    split_positions: pieces of a split document "restart" at position 0 or "continue" counting.
    process_index/process_count: default jax.process_index()/process_count().
    data_shards: independent pipelines making up the global batch (default: process_count). The
      batches, and a checkpointed position, do not depend on the process count as long as it
      divides data_shards: set it to a multiple of every host count a run may resume on.
    worker_count: grain mp_prefetch processes per shard (0 = none; on 2 cores none is fastest).
    with_ids: also emit doc_ids [B,T] (document index in its dataset, -1 = padding) and
      dataset_ids [B,T] (index into the iterator's .specs, -1 = padding) for tests and inspection.
      A response dataset among `data` (stats.json "loss_on": "response") scores only the targets
      that are response tokens (see the module doc).
    mix: how weights act. "rows": each dataset is packed alone and packed rows are interleaved in
      proportion (exact token shares when rows are full: the default with concat_split);
      "documents": documents are interleaved with probability ∝ weight / mean length, then packed
      together (fit packers fill one dataset's gaps with another's documents: the default for
      first_fit / best_fit, e.g. stage 3's length buckets); token shares hold in expectation.
    """
    if packing not in PACKERS or split_positions not in SPLIT_POSITIONS:
        raise ValueError(f"packing ∈ {PACKERS}, split_positions ∈ {SPLIT_POSITIONS}")
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    shards = data_shards or process_count
    if shards % process_count:
        raise ValueError(f"data_shards={shards} is not a multiple of the {process_count} processes")
    if global_batch_size % shards:
        raise ValueError(f"global_batch_size {global_batch_size} not divisible by {shards} data shards "
                         f"(make_dataset.data_shards, default: one per process)")
    rows = global_batch_size // shards
    specs = resolve(data)
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys) or any(s.weight <= 0 for s in specs):
        raise ValueError(f"dataset names must be unique and weights positive: {specs}")
    if len(specs) > 1 and num_epochs is not None:
        raise ValueError("a mixture needs num_epochs=None (a component running dry would stop it)")
    if mix not in ("auto", "rows", "documents"):
        raise ValueError(f"mix ∈ auto, rows, documents: {mix}")
    kw = dict(seq_len=seq_len, seed=seed, shuffle=shuffle, num_epochs=num_epochs, data_shards=shards,
              packing=packing, split_positions=split_positions, num_packing_bins=num_packing_bins or 4 * rows,
              read_threads=read_threads, with_ids=with_ids)
    if any(_loss_on(s.path) == "response" for s in specs):  # only then: plain runs keep their fingerprint
        kw["loss_on"] = "response"
    mix = ("rows" if packing == "concat_split" else "documents") if mix == "auto" else mix
    owned = range(process_index * shards // process_count, (process_index + 1) * shards // process_count)
    ds = _ConcatShards([_shard(specs, mix, rows, worker_count, shard=s, **kw) for s in owned], owned)
    if prefetch_batches:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
    cfg = dict(kw, mix=mix, specs=[dataclasses.asdict(s) for s in specs], rows=rows, worker_count=worker_count)
    fingerprint = hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]
    settings = {k: v for k, v in cfg.items() if k != "specs"}  # names what differs on a refused resume
    settings["datasets"] = {s.key: s.weight for s in specs}
    return DataIterator(ds.__iter__(), fingerprint, specs, rows * len(owned), seq_len, owned, shards, settings)


def _shard(specs: list[DatasetSpec], mix: str, rows: int, worker_count: int, **kw) -> grain.IterDataset:
    """One data shard: its documents of every dataset → packed, mixed rows → batches of `rows`."""
    keys = [s.key for s in specs]
    docs = {s.key: _documents(s, i, **kw) for i, s in enumerate(specs)}
    if len(specs) == 1:
        ds = _pack(docs[keys[0]][0], key=keys[0], **kw)
    elif mix == "rows":  # weight = share of rows
        ds = grain.IterDataset.mix({k: _pack(d, key=k, **kw) for k, (d, _) in docs.items()},
                                   {s.key: s.weight for s in specs})
    else:  # weight / mean document length = share of documents → expected share of tokens
        ds = _pack(grain.IterDataset.mix({k: d for k, (d, _) in docs.items()},
                                         {s.key: s.weight / docs[s.key][1] for s in specs}), key="+".join(keys), **kw)
    ds = ds.batch(rows, drop_remainder=False).map(Finish(rows))
    if worker_count:
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ds


def to_global(batch: Mapping[str, np.ndarray], mesh, partition_spec) -> dict:
    """Per-host numpy batch → global jax.Arrays on `mesh` (jax.make_array_from_process_local_data).

    partition_spec is for [B, T] arrays (e.g. P(('data', 'fsdp'), None)); it is cut to the rank of
    lower-rank arrays. A dict {key: spec} sets it per key. Global batch = B_host × process_count.
    """

    out = {}
    for k, v in batch.items():
        spec = partition_spec[k] if isinstance(partition_spec, Mapping) else partition_spec
        spec = PartitionSpec(*tuple(spec)[:np.ndim(v)])
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(v))
    return out

