"""The data QA stages of prepare.py on a corpus with planted problems (tests/data/planted_corpus.py):
every planted case removed for its reason and nothing else, near duplicates against brute-force
Jaccard, the bundled eval set as a benchmark, the same bytes for 1 and 2 workers, a crash and a
re-run, the report, and the QA'd shards training with launch/train.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import qa_config, qa_rules, qa_store, qa_text
from data_pipeline.prepare import CRASH_ENV, main as prepare_main, prepare
from planted_corpus import build, shingles
from train_utils import run, tiny_args

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TINY_MC = os.path.join(REPO, "data_pipeline", "evalsets", "tiny_mc.jsonl")
QA = ["--dedup", "--quality", "rules"]


def _qa_args(d, out, *extra):
    return ["--input", str(d / "corpus.jsonl"), "--tokenizer", "qwen3", "--out", str(out), "--shards", "4",
            "--decontaminate", str(d / "bench.jsonl"), *QA, "--no_progress", *extra]


def _stages(out, n):
    """{record index: stage that removed it} from the qa/ files."""
    got = {}
    for s in range(n):
        r = qa_store.read(str(out), "removed", s, n)
        for i, c in zip(r["idx"].tolist(), r["code"].tolist()):
            got[i] = qa_store.STAGE_OF[c]
    return got


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    counts = build(str(d), clean=240, seed=1)
    out = d / "prepared"
    assert prepare_main(_qa_args(d, out, "--workers", "0")) == 0
    truth = [json.loads(line) for line in (d / "truth.jsonl").read_text().splitlines()]
    return d, out, truth, counts


EXPECTED = {"exact_dup": "exact_dedup", "near_dup": "near_dedup", "leak": "decontaminate", "junk": "quality_rules"}


def test_every_planted_case_is_removed_for_its_reason_and_nothing_else(planted):
    d, out, truth, counts = planted
    got = _stages(out, 4)
    for kind, stage in EXPECTED.items():
        idx = [i for i, t in enumerate(truth) if t["kind"] == kind]
        right = sum(got.get(i) == stage for i in idx)
        assert right >= 0.95 * len(idx) and len(idx) >= 8, (kind, right, len(idx),
                                                             [(i, got.get(i)) for i in idx if got.get(i) != stage])
    keep = [i for i, t in enumerate(truth) if t["kind"] in ("clean", "similar")]
    assert sum(i in got for i in keep) <= 0.02 * len(keep), [(i, truth[i], got[i]) for i in keep if i in got]
    st = json.loads((out / "stats.json").read_text())
    assert st["documents"] == len(truth) - len(got)
    qa = st["qa"]
    assert qa["stages"] == ["decontaminate", "quality_rules", "exact_dedup", "near_dedup"]
    assert qa["documents_in"] == len(truth)
    assert sum(v["removed_documents"] for v in qa["per_stage"].values()) == len(got)
    assert qa["per_stage"]["near_dedup"]["kept"] == st["documents"]
    assert sum(qa["removed_tokens"].values()) > 0 and qa["contamination_hits"] == {"bench.jsonl": counts["leak"]}
    plan = json.loads((out / "plan.json").read_text())
    assert plan["stages"] == [*qa["stages"], "tokenize"] and plan["qa"]["near_dedup"]["threshold"] == 0.8
    samples = [json.loads(x) for x in (out / "removed_samples.jsonl").read_text().splitlines()]
    assert {s["stage"] for s in samples} == set(EXPECTED.values())
    assert all(truth[s["index"]]["kind"] in EXPECTED and s["text"] and s["detail"] for s in samples)
    assert sorted(qa["report"]) == [f"report/{s}.png" for s in sorted(qa["stages"])]
    assert all((out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in qa["report"])


def test_near_duplicates_against_brute_force_jaccard(planted):
    d, out, truth, _ = planted
    got = _stages(out, 4)
    texts = [json.loads(x)["text"] for x in (d / "corpus.jsonl").read_text().splitlines()]
    reach = [i for i in range(len(texts)) if got.get(i) in (None, "near_dedup")]  # what near_dedup saw
    sh = {i: set(shingles(texts[i]).tolist()) for i in reach}
    parent = {i: i for i in reach}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    pairs = 0
    for a_pos, a in enumerate(reach):
        for b in reach[a_pos + 1:]:
            small, big = sorted((len(sh[a]), len(sh[b])))
            if small < 0.8 * big:  # Jaccard <= small / big
                continue
            inter = len(sh[a] & sh[b])
            if inter / (len(sh[a]) + len(sh[b]) - inter) >= 0.8:
                pairs += 1
                ra, rb = find(a), find(b)
                parent[max(ra, rb)] = min(ra, rb)
    expected = {i for i in reach if find(i) != i}
    removed = {i for i, st in got.items() if st == "near_dedup"}
    assert pairs >= 8 and expected
    recall, precision = len(expected & removed) / len(expected), len(expected & removed) / len(removed)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision, sorted(expected ^ removed))


def test_same_bytes_for_one_and_two_workers_and_after_a_crash(planted, tmp_path):
    d, out, _, _ = planted
    two = tmp_path / "two"
    assert prepare_main(_qa_args(d, two, "--workers", "2")) == 0
    crashed = tmp_path / "crashed"
    cmd = [sys.executable, "data_pipeline/prepare.py", *_qa_args(d, crashed, "--workers", "0")]  # 2: `two`
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, CRASH_ENV: "1"}, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr[-2000:]
    assert (crashed / "qa" / "analysis.json").exists() and not (crashed / "stats.json").exists()
    assert len([f for f in os.listdir(crashed) if f.startswith("shard-") and f.endswith(".json")]) == 1
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads((crashed / "stats.json").read_text())["last_run_shards_written"]) == 3

    def files(folder):
        found = {}
        for root, _, names in os.walk(folder):
            for name in names:
                rel = os.path.relpath(os.path.join(root, name), folder)
                data = open(os.path.join(root, name), "rb").read()
                if rel == "stats.json":
                    st = json.loads(data)
                    data = json.dumps({k: v for k, v in st.items() if not k.startswith("last_run")}).encode()
                found[rel] = data
        return found
    ref = files(out)
    assert any(f.startswith("report/") for f in ref) and "qa/removed-00000-of-00004.npz" in ref
    for other in (two, crashed):
        got = files(other)
        assert sorted(got) == sorted(ref)
        assert [f for f in ref if got[f] != ref[f]] == []


def test_the_bundled_eval_set_as_the_benchmark(tmp_path):
    items = [json.loads(x) for x in open(TINY_MC)]
    rng = np.random.default_rng(0)
    words = "the data model returns a value for each key and the list holds several items of text".split()
    clean = [" ".join(rng.choice(words, 80)) for _ in range(30)]
    # clean documents that mention a short item's words among many others are kept
    clean += ["for i in range(10): print(i) " * 3 + " ".join(rng.choice(words, 60)),
              "The sun rises in the east, " + " ".join(rng.choice(words, 60))]
    leaks = [f"{it['context']}{it['choices'][it['answer']]}" for it in items]
    docs = clean + leaks
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = tmp_path / "out"
    st = prepare([str(tmp_path / "in.jsonl")], "qwen3", str(out), shards=2, workers=0, progress=False,
                 decontaminate=[TINY_MC])
    assert st["qa"]["removed"] == {"contaminated": len(leaks)}
    assert sorted(_stages(out, 2)) == list(range(len(clean), len(docs)))


def test_ngram_index_units():
    idx = qa_text.NgramIndex(n=13, min_words=8)
    idx.add("one two three four five six seven eight nine ten eleven twelve thirteen fourteen", 0)
    idx.add("alpha beta gamma delta epsilon zeta eta theta", 1)  # 8 words: matched whole
    idx.add("the sun rises in the east", 2)  # 6 words: only a document of at most 12 words
    m = lambda t: idx.matches(qa_text.word_hashes(qa_text.words(t)))  # noqa: E731
    assert m("x " * 40 + "Two, THREE four five six seven eight nine ten eleven twelve thirteen fourteen!") == 1
    assert m("x " * 40 + "three four five six seven eight nine ten eleven twelve thirteen fourteen") == 0
    assert m("y " * 50 + "alpha beta gamma delta epsilon zeta eta theta" + " y" * 50) == 2
    assert m("y " * 50 + "alpha beta gamma delta epsilon zeta eta" + " y" * 50) == 0
    assert m("Question 7: the Sun rises in the East.") == 4
    assert m("z " * 20 + "the sun rises in the east") == 0


def test_minhash_estimates_jaccard_and_lsh_finds_the_pairs():
    rng = np.random.default_rng(0)
    h = qa_text.MinHasher(128, 1)
    errs = []
    for j in (0.3, 0.5, 0.8, 0.9):
        for _ in range(20):
            n = 400
            common = int(round(2 * n * j / (1 + j)))
            a = rng.choice(1 << 31, n, replace=False).astype(np.uint32)
            b = np.concatenate([a[:common], rng.choice(1 << 31, n - common).astype(np.uint32) + (1 << 31)])
            a, b = np.unique(a), np.unique(b)
            est = float(np.mean(h.signature(a) == h.signature(b)))
            errs.append(est - qa_text.jaccard(a, b))
    assert abs(np.mean(errs)) < 0.01 and np.std(errs) < 0.05
    assert qa_text.candidate_probability(0.8, 25, 5) > 0.9999 and qa_text.candidate_probability(0.2, 25, 5) < 0.01


@pytest.mark.parametrize("kind", ["symbols", "short", "repeated_lines", "lorem", "bullets", "hashtags", "ellipsis",
                                  "random_letters", "spam"])
def test_each_junk_kind_fails_a_rule_and_clean_prose_passes(kind):
    from planted_corpus import Writer, junk
    w = Writer(0)
    assert qa_rules.check(junk(w, kind)) is not None
    assert all(qa_rules.check(w.document()) is None for _ in range(20))


def test_code_gets_code_rules():
    """Source files get the Codex / StarCoder rules (web rules would drop most good code); each code
    rule fails on the code it targets; rules:web / rules:code override the choice by extension."""
    from data_pipeline import corpus
    files = corpus.stdlib_sources()[::20]
    texts = [open(f, encoding="utf-8").read() for f in files]
    assert [qa_rules.kind_of(f) for f in files] == ["code"] * len(files)
    assert qa_rules.kind_of("a/b.jsonl.zst") == "web" and qa_rules.kind_of("a/b.jsonl", "code") == "code"
    assert qa_rules.kind_of("x.py", "web") == "web"
    web = sum(qa_rules.check(t, "web") is not None for t in texts)
    code = sum(qa_rules.check(t, "code") is not None for t in texts)
    assert code <= 0.05 * len(texts) < 0.3 * len(texts) <= web, (code, web, len(texts))
    good = "def f(x):\n    return x + 1\n"
    for name, bad in (("code_max_size", good * 40_000),
                      ("code_autogenerated", "# Generated by protoc. DO NOT EDIT.\n" + good),
                      ("code_mean_line_length", "x = [" + "1, " * 80 + "]\n" + "y = [" + "2, " * 80 + "]\n"),
                      ("code_max_line_length", good * 30 + "s = '" + "a" * 1200 + "'\n" + good * 30),
                      ("code_alnum_fraction", good + ("#" * 60 + "\n") * 5)):
        assert qa_rules.check(bad, "code")[0] == name, name
    assert qa_rules.check(good, "code") is None
    assert qa_config.parse_quality("rules:code") == ("code", None)
    assert qa_config.parse_quality("rules") == ("auto", None)


def test_bad_qa_arguments_are_one_line_and_write_nothing(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n{oops\n')
    base = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer", "qwen3", "--out", str(tmp_path / "out")]
    for flags, says in ((["--decontaminate", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
                        (["--decontaminate", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: not JSON"),
                        (["--quality", "rulez"], "--quality rulez: expected"),
                        (["--quality", "rules:css"], "--quality rules:css: expected"),
                        (["--quality", f"model:{tmp_path}"], "needs one of --quality_threshold"),
                        (["--quality_threshold", "1.0"], "need --quality model:PATH")):
        assert prepare_main(base + flags) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
        assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="expected rules"):
        qa_config.parse_quality("model")


@pytest.mark.slow
def test_qa_shards_train_with_launch_train(spm512, data_dir, tmp_path):
    d = tmp_path / "planted"
    build(str(d), clean=60, seed=2)
    ds = tmp_path / "ds"
    st = prepare([str(d / "corpus.jsonl")], spm512["tokenizer"], str(ds), shards=2, workers=0, progress=False,
                 dedup=True, decontaminate=[str(d / "bench.jsonl")], quality="rules")
    assert st["documents"] >= 60 and sum(st["qa"]["removed"].values()) > 0
    r = run(tiny_args(data_dir, tmp_path / "run", f"make_dataset.data='{ds}'", "train.eval_every=0",
                      "train.sample_every=0", steps=4, every=4))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "4").is_dir()
