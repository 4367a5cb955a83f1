"""Response datasets (stats.json "loss_on": "response"): the loss mask scores response targets only,
plain datasets in the same mixture keep their full mask, plain runs are unchanged, bad
prompt-length files are named."""
import json
import os

import numpy as np
import pytest

from data_pipeline.pipeline import BATCH_KEYS, DatasetSpec, Mixture, make_dataset
from data_pipeline.prepare import ShardWriter, aggregate_stats, shard_bounds, write_json
from data_pipeline.shards import ShardError

BASE = 10  # document tokens are BASE + their position in the document: a target's position is readable


def _write(out, lengths, prompt_lengths=None, shards=2):
    """A dataset folder written through prepare.py's writer: document d is BASE + arange(lengths[d])."""
    plan = {"shards": shards, "records": len(lengths), "dtype": "uint16", "eos_id": 1, "vocab_size": 512,
            "tokenizer": "test", "inputs": ["test"]}
    if prompt_lengths is not None:
        plan["loss_on"] = "response"
    os.makedirs(out)
    write_json(os.path.join(out, "plan.json"), plan)
    bounds = shard_bounds(plan)
    for s in range(shards):
        w = ShardWriter(str(out), s, plan)
        for d in range(bounds[s], bounds[s + 1]):
            w.add(np.arange(BASE, BASE + lengths[d], dtype=np.uint16), 0,
                  None if prompt_lengths is None else int(prompt_lengths[d]))
        w.close()
    write_json(os.path.join(out, "stats.json"), aggregate_stats(str(out), plan, 0.0))
    return str(out)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("responses")
    rng = np.random.RandomState(0)
    lengths = rng.randint(2, 40, 60)
    prompts = np.array([rng.randint(0, n + 1) for n in lengths])
    prompts[:3] = [0, lengths[1], lengths[2] - 1]  # all response, all prompt, only the last token scored
    plain = rng.randint(2, 40, 50)
    return {"root": str(root), "resp": _write(root / "resp", lengths, prompts), "plain": _write(root / "plain", plain),
            "lengths": lengths, "prompts": prompts, "plain_lengths": plain}


def _expected_mask(b, prompts_of):
    """Position t is scored iff token t+1 is in the same document and (response datasets) past the prompt."""
    seg, tok, ds, doc = b["segment_ids"], b["tokens"], b["dataset_ids"], b["doc_ids"]
    want = np.zeros(seg.shape, np.float32)
    for r, t in zip(*np.nonzero(seg[:, :-1])):
        if seg[r, t + 1] != seg[r, t]:
            continue
        prompt = prompts_of[ds[r, t + 1]]
        target_pos = tok[r, t + 1] - BASE
        want[r, t] = prompt is None or target_pos >= prompt[doc[r, t + 1]]
    return want


@pytest.mark.parametrize("packing", ["concat_split", "first_fit"])
def test_mask_scores_response_targets_and_plain_data_keeps_its_mask(folders, packing):
    it = make_dataset(Mixture(weights={"resp": 0.5, "plain": 0.5}, root=folders["root"]), seq_len=32,
                      global_batch_size=4, packing=packing, process_index=0, process_count=1, with_ids=True)
    prompts_of = [folders["prompts"] if s.key == "resp" else None for s in it.specs]
    seen = set()
    for _ in range(12):
        b = next(it)
        assert {k: v.dtype for k, v in b.items() if k in BATCH_KEYS} == {
            "tokens": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
            "loss_mask": np.float32}
        assert set(b) == set(BATCH_KEYS) | {"doc_ids", "dataset_ids"}  # no extra key leaks out
        np.testing.assert_array_equal(b["loss_mask"], _expected_mask(b, prompts_of))
        assert (b["targets"][b["loss_mask"] == 0] == 0).all()
        seen |= set(b["dataset_ids"][b["loss_mask"] > 0].tolist())
    assert seen == {0, 1}  # both datasets were scored
    state = it.get_state()
    assert state["settings"]["loss_on"] == "response" and "resp" in json.dumps(state)
    it2 = make_dataset(Mixture(weights={"resp": 0.5, "plain": 0.5}, root=folders["root"]), seq_len=32,
                       global_batch_size=4, packing=packing, process_index=0, process_count=1, with_ids=True)
    it2.set_state(json.loads(json.dumps(state)))
    want, got = next(it), next(it2)
    assert all((want[k] == got[k]).all() for k in want)  # resumes exactly with the response feature


@pytest.mark.parametrize("length_range", [None, (10, 30)])
def test_one_epoch_scores_exactly_the_response_tokens(folders, length_range):
    """first_fit keeps whole documents (all shorter than a row): every response target once, also
    through a length bucket's view (documents renumbered inside it, prompt lengths by document)."""
    spec = DatasetSpec(folders["resp"], length_range=length_range)
    it = make_dataset(spec, seq_len=48, global_batch_size=4, packing="first_fit", num_epochs=1,
                      process_index=0, process_count=1, with_ids=True)
    per_doc = np.zeros(len(folders["lengths"]), int)
    for b in it:
        np.add.at(per_doc, b["doc_ids"][b["loss_mask"] > 0], 1)
    # a document of L tokens with P prompt tokens has targets at positions max(P, 1) .. L-1
    lengths = folders["lengths"]
    want = lengths - np.maximum(folders["prompts"], 1)
    if length_range is not None:
        want = np.where((lengths > length_range[0]) & (lengths <= length_range[1]), want, 0)
    else:
        assert want[1] == 0 and want[2] == 1
    np.testing.assert_array_equal(per_doc, want)


def test_plain_runs_carry_no_response_feature(folders):
    kw = dict(seq_len=32, global_batch_size=4, process_index=0, process_count=1)
    plain = make_dataset(folders["plain"], **kw)
    masked = make_dataset(Mixture(weights={"resp": 0.5, "plain": 0.5}, root=folders["root"]), **kw)
    also_plain = make_dataset(Mixture(weights={"plain": 1.0}, root=folders["root"]), **kw)
    b = next(plain)
    assert set(b) == set(BATCH_KEYS)
    state = plain.get_state()
    assert "loss_on" not in plain.settings and "resp" not in json.dumps(state)
    assert "loss_on" not in also_plain.settings and masked.settings["loss_on"] == "response"
    # the plain dataset's own mask: every next token of the same document
    seg = b["segment_ids"]
    want = np.zeros(seg.shape, np.float32)
    want[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    np.testing.assert_array_equal(b["loss_mask"], want)
    # plain runs add no key to the fingerprinted configuration; reading a response dataset does
    assert plain.fingerprint == make_dataset(folders["plain"], **kw).fingerprint != masked.fingerprint


@pytest.mark.parametrize("damage, says", [
    ("delete", "missing (stats.json says loss_on='response')"),
    ("short", "2 prompt lengths for"),
    ("long", "has prompt length 999"),
])
def test_bad_prompt_lengths_name_the_file(folders, tmp_path, damage, says):
    import shutil
    d = tmp_path / "resp"
    shutil.copytree(folders["resp"], d)
    f = d / "shard-00001-of-00002.prompt_lengths.npy"
    if damage == "delete":
        f.unlink()
    else:
        pl = np.load(f)
        np.save(f, pl[:2] if damage == "short" else np.r_[999, pl[1:]].astype(np.int32))
    with pytest.raises(ShardError) as e:
        make_dataset(str(d), seq_len=32, global_batch_size=4, process_index=0, process_count=1)
    msg = str(e.value)
    assert str(f) in msg and says in msg and "make_responses.py" in msg and "\n" not in msg
