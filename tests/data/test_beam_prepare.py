"""prepare.py's Beam runner: progress lines, a worker process that dies, Beam options, the report
without matplotlib. (Formats, bad records, crash + resume: test_prepare.py; bad files and SIGKILL:
test_faults_data.py; the QA stages: test_data_qa.py.)"""
import builtins
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipeline import beam_run
from data_pipeline.prepare import main as prepare_main, prepare

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _corpus(path, n=1200, words=100):
    rng = np.random.default_rng(0)
    vocab = [f"w{k}" for k in range(5000)]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(vocab, words))}) + "\n" for _ in range(n)))


def test_progress_lines_say_docs_tokens_and_eta(tmp_path):
    _corpus(tmp_path / "in.jsonl", n=300)
    r = subprocess.run([sys.executable, "data_pipeline/prepare.py", "--input", str(tmp_path / "in.jsonl"),
                        "--tokenizer", "qwen3", "--out", str(tmp_path / "out"), "--shards", "2", "--workers", "0",
                        "--progress_every", "0.5"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("prepare: write ")]
    assert lines and lines[-1].startswith("prepare: write 300/300 docs (100%)") and "done" in lines[-1], r.stderr
    assert all("docs/s" in x and "M tokens/s" in x for x in lines)
    assert all("ETA" in x for x in lines[:-1])
    assert not [x for x in r.stderr.splitlines() if not x.startswith("prepare: ")], r.stderr  # nothing else


def _workers_of(pid):
    return sorted(beam_run._children(pid))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_that_dies_ends_the_run_with_one_line_and_a_rerun_resumes(tmp_path):
    _corpus(tmp_path / "in.jsonl", n=2400)
    out = tmp_path / "out"
    cmd = [sys.executable, "data_pipeline/prepare.py", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", "qwen3",
           "--out", str(out), "--shards", "8", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, first = time.time() + 180, out / "shard-00000-of-00008.json"
    while time.time() < deadline and proc.poll() is None and not (first.exists() and len(_workers_of(proc.pid)) == 2):
        time.sleep(0.05)
    victims = _workers_of(proc.pid)
    assert len(victims) == 2 and proc.poll() is None, (victims, proc.poll())
    os.kill(victims[0], signal.SIGKILL)  # as the kernel's OOM killer would
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and "a worker process died" in err and "re-run the same command" in err, err
    assert not (out / "stats.json").exists()
    assert not [p for p in _workers_of(os.getpid())]
    time.sleep(1.5)  # the other worker noticed its parent is gone
    finished = {int(f.name[6:11]) for f in out.glob("shard-*.json")}  # (the other worker may have done the rest)
    assert finished
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    st = json.loads((out / "stats.json").read_text())
    assert st["documents"] == 2400 and st["last_run_shards_written"] == sorted(set(range(8)) - finished)


def test_beam_options_need_another_runner(tmp_path, capsys):
    _corpus(tmp_path / "in.jsonl", n=5)
    with pytest.raises(SystemExit):
        prepare_main(["--input", str(tmp_path / "in.jsonl"), "--tokenizer", "qwen3", "--out", str(tmp_path / "o"),
                      "--project", "p"])
    assert "unrecognized arguments: --project p" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_report_without_matplotlib_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    real = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    from planted_corpus import Writer, junk
    w = Writer(0)
    docs = [w.document(), junk(w, "hashtags")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    st = prepare([str(tmp_path / "in.jsonl")], "qwen3", str(tmp_path / "out"), shards=1, workers=0, progress=False,
                 quality="rules")
    assert st["qa"]["removed"] == {"rules:gopher_hash_ratio": 1}
    assert "matplotlib is not installed" in st["qa"]["report"]
    assert capsys.readouterr().err.count("matplotlib is not installed") == 1
    assert not (tmp_path / "out" / "report").exists()
