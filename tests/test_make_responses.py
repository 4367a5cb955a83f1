"""launch/make_responses.py: a tiny random teacher answers a prompt file in both thinking modes;
records = rendered prompt + response, the loss mask covers the response only, the thinking budget
holds, and a run killed after its first shard resumes to the same bytes (no duplicate, no loss)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource

from data_pipeline.prepare import CRASH_ENV
from qwen3_jax import get_config
from qwen3_jax.model import create_model
from qwen3_jax.params import flat_params
from qwen3_jax import checkpoint
from train_utils import load_script, xla_flags

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [{"prompt": "What is 2+2?"}, {"messages": [{"role": "user", "content": "def f(x):"}]},
           {"prompt": "Name a colour."}, {"messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Why?"}]}]
BUDGET = 3


mr = load_script("launch/make_responses.py", "make_responses_cli")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data_pipeline.text_tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("responses")
    tok = train_sentencepiece(str(d / "spm"), 512, max_chars=300_000)
    cfg = get_config("tiny-dense", compute_dtype="float32", remat="none")
    checkpoint.save_params(d / "teacher", 5, flat_params(create_model(cfg, 7)), cfg, {"note": "test teacher"})
    prompts = d / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS[:2]) + "\n\n" +
                       "\n".join(json.dumps(p) for p in PROMPTS[2:]) + "\n")
    return {"dir": d, "tokenizer": tok, "teacher": str(d / "teacher"), "prompts": str(prompts)}


def _args(setup, out, *extra):
    # 4 prompts x 2 modes = 8 records; 2 shards of one batch of 4 each (one mode per shard)
    return ["--teacher", setup["teacher"], "--prompts", setup["prompts"], "--out", str(out), "--tokenizer",
            setup["tokenizer"], "--max_new_tokens", "96", "--thinking_budget", str(BUDGET), "--batch_size", "4",
            "--shards", "2", "--steps_per_call", "32", "--no_progress", *extra]


def _records(out):
    st = json.loads((Path(out) / "stats.json").read_text())
    recs = []
    for s in st["shards"]:
        ids = ArrayRecordDataSource([str(Path(out) / s)])
        pl = np.load(Path(out) / s.replace(".array_record", ".prompt_lengths.npy"))
        recs += [(np.frombuffer(ids[i], st["dtype"]).tolist(), int(pl[i])) for i in range(len(ids))]
    return st, recs


@pytest.fixture(scope="module")
def full_run(setup):
    out = setup["dir"] / "data" / "responses"
    assert mr.main(_args(setup, out)) == 0
    return out


def test_batches_never_cross_a_mode_or_a_shard():
    assert [list(b) for b in mr.batches(2, 9, 4, 3)] == [[2, 3], [4, 5, 6], [7], [8]]
    assert mr.batch_seed(0, 4) == mr.batch_seed(0, 4) != mr.batch_seed(1, 4)


@pytest.mark.slow
def test_records_are_prompt_plus_response_and_the_mask_covers_the_response(setup, full_run):
    from qwen3_jax.inference import load_text_generator

    st, recs = _records(full_run)
    tg = load_text_generator(checkpoint=setup["teacher"], tokenizer=setup["tokenizer"])  # no generation: no compile
    tok = tg.tokenizer
    assert st["loss_on"] == "response" and st["modes"] == ["think", "no_think"] and st["documents"] == 8
    assert st["prompt_tokens"] + st["response_tokens"] == st["tokens"] == sum(len(r) for r, _ in recs)
    assert json.loads((full_run / "plan.json").read_text())["loss_on"] == "response"
    think_open = tok.encode("<think>\n", allow_special=True)
    empty_block = tok.encode("<think>\n\n</think>\n\n", allow_special=True)
    stop = list(tg.stop_ids)
    im_end = tok.special_ids["<|im_end|>"]
    prompts = [p.get("prompt") or p["messages"] for p in PROMPTS]
    budget_hit = 0
    for k, (ids, n) in enumerate(recs):  # mode by mode: all prompts thinking, then all not
        think, prompt = k < 4, prompts[k % 4]
        assert ids[:n] == tg.prompt_tokens(prompt, chat=True, thinking=think)  # the template's rendering
        resp = ids[n:]
        assert resp[-1] == tok.eos_id and tok.eos_id not in resp[:-1]  # one separator, at the end
        assert im_end not in resp[:-2]  # the response stops at <|im_end|> (or at the token limit)
        if think:  # the turn opens the block; at most BUDGET thinking tokens before it closes
            assert resp[:len(think_open)] == think_open
            body = resp[len(think_open):]
            ends = [i for i in range(len(body)) if body[i:i + len(stop)] == stop or body[i] in (
                tg.think_close, im_end, tok.eos_id)]
            assert ends and ends[0] <= BUDGET, tok.decode(body)  # the stop text ends with </think>
            budget_hit += body[BUDGET:BUDGET + len(stop)] == stop
        else:  # the template closed an empty block in the prompt; the answer thinks no more
            assert ids[n - len(empty_block):n] == empty_block and tg.think_open not in resp
    assert budget_hit >= 1  # the random teacher rambles: the budget stopped it
    assert st["counts"]["think_thinking_tokens"] <= BUDGET * 4 and st["counts"]["no_think_thinking_tokens"] == 0

    # the pipeline scores exactly the response tokens (first_fit keeps documents whole)
    from data_pipeline.pipeline import make_dataset
    from qwen3_jax.train.data import stage_mixture

    it = make_dataset(str(full_run), seq_len=256, global_batch_size=2, packing="first_fit", num_epochs=1,
                      process_index=0, process_count=1, with_ids=True)
    per_doc = np.zeros(len(recs), int)
    for b in it:
        np.add.at(per_doc, b["doc_ids"][b["loss_mask"] > 0], 1)
        for r, t in zip(*np.nonzero(b["loss_mask"])):  # every scored target lies past its document's prompt
            doc = recs[b["doc_ids"][r, t]]
            assert b["positions"][r, t] + 1 >= doc[1]
    np.testing.assert_array_equal(per_doc, [len(ids) - max(n, 1) for ids, n in recs])
    # the folder works as a named dataset of a stage mixture (configs/distill_offpolicy.gin)
    mix = stage_mixture({"responses": 1.0}, root=str(full_run.parent), split=None)
    b = next(make_dataset(mix, seq_len=64, global_batch_size=2, process_index=0, process_count=1))
    assert b["loss_mask"].sum() > 0 and set(b) == {"tokens", "targets", "segment_ids", "positions", "loss_mask"}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_bytes(setup, full_run, tmp_path, capsys):
    out = tmp_path / "responses"
    cmd = [sys.executable, str(ROOT / "launch" / "make_responses.py"), *_args(setup, out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    r = subprocess.run(cmd, cwd=ROOT, env={**env, CRASH_ENV: "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    names = sorted(os.listdir(out))
    assert "shard-00000-of-00002.json" in names and "shard-00001-of-00002.json" not in names
    assert "stats.json" not in names and any(".tmp" in f for f in names)  # died inside shard 1
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not any(".tmp" in f for f in os.listdir(out))
    for f in sorted(os.listdir(full_run)):
        if f.startswith("shard-"):
            assert (out / f).read_bytes() == (full_run / f).read_bytes(), f
    st, recs = _records(out)
    assert st["last_run_shards_written"] == [1] and st["documents"] == 8
    assert len({tuple(ids) for ids, _ in recs}) == 8  # no duplicate
    # complete: a re-run is a no-op (before the teacher loads); a different plan is refused by name
    assert mr.main(_args(setup, out)) == 0 and json.loads((out / "stats.json").read_text()) == st
    assert mr.main(_args(setup, out) + ["--seed", "1", "--top_k", "5"]) == 2
    err = capsys.readouterr().err
    assert "plan differs in ['sampling', 'seed']" in err and err.count("\n") == 1


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert mr.main(_args(setup, tmp_path / "o1") + ["--prompts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: expected" in err and err.count("\n") == 1
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert mr.main(_args(setup, tmp_path / "o2") + ["--prompts", str(bad)]) == 2
    assert f"{bad}:2: not JSON" in capsys.readouterr().err
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert mr.read_prompts(str(txt)) == ["one", "two"]
    assert mr.main(_args(setup, tmp_path / "o3") + ["--shards", "9"]) == 2
    assert "cannot fill 9 shards" in capsys.readouterr().err
    assert mr.main(_args(setup, tmp_path / "o4") + ["--teacher", str(tmp_path / "nowhere")]) == 2
    assert "--teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mr.main(_args(setup, tmp_path / "o5") + ["--modes", "think,maybe"])
    assert "--modes" in capsys.readouterr().err
