"""`jaxlm data prepare` as a map over input files and a reduce: the output does not depend on the
number of workers, the executor, or a kill and resume."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxlm.config import from_dict
from jaxlm.prepare import prepare

WORDS = ("the of and to in that have with be it for on as at by this from or an are was we river stone "
         "garden window morning letter music travel story paper light table city north harbour").split()


def prose(rng, n_words=90):
    words = rng.choice(WORDS, n_words)
    return " ".join(" ".join(words[i:i + 9]).capitalize() + "." for i in range(0, n_words, 9))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources of several files, with exact and near duplicates within and across files and sources."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    pool = [prose(rng) for _ in range(60)]
    for source, n_files in (("web", 6), ("books", 3)):
        (root / source).mkdir()
        for f in range(n_files):
            docs = [prose(rng) for _ in range(30)]
            docs[3] = pool[int(rng.integers(len(pool)))]  # exact duplicates, anywhere
            near = pool[int(rng.integers(len(pool)))].split()
            near[7] = "lantern"
            docs[8] = " ".join(near)  # near duplicates
            docs[12] = "Mail me at someone@example.com. " + docs[12]
            lines = [json.dumps({"text": d, "n": f * 100 + i}) for i, d in enumerate(docs)] + ["{broken"]
            (root / source / f"{f:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def tree(corpus, out, **settings):
    return {"prepare": {"out_dir": str(out), "task_mb": 1e-6,  # one task per file
                        "rules": {"pii": True, "gopher_repetition": True},
                        "sources": [{"name": "web", "paths": [str(corpus / "web")], "id_field": "n"},
                                    {"name": "books", "paths": [str(corpus / "books" / "*.jsonl")]}],
                        **settings}}


def outputs(out):
    report = json.loads((out / "report.json").read_text())
    return ({name: (out / f"{name}.jsonl").read_text() for name in ("web", "books")},
            report["sources"], sorted((out / "rejects.jsonl").read_text().splitlines()))


@pytest.fixture(scope="module")
def one_worker(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    prepare(from_dict(tree(corpus, out, workers=1)).prepare, log=lambda *_: None)
    assert not (out / "work").exists()  # the map's files go once the outputs are written
    return outputs(out)


def test_the_map_and_reduce_account_for_every_document(one_worker):
    texts, report, rejects = one_worker
    for name, n_files in (("web", 6), ("books", 3)):
        c = report[name]
        assert c["read"] == 31 * n_files and c["kept"] + sum(c["dropped"].values()) == c["read"]
        assert c["dropped"]["read.malformed_json"] == n_files and c["changed"]["pii.scrubbed"] >= n_files
        assert len(texts[name].splitlines()) == c["kept"]
    dropped = {reason for c in report.values() for reason in c["dropped"]}
    assert {"dedup.exact", "dedup.minhash"} <= dropped
    assert len(rejects) == sum(sum(c["dropped"].values()) for c in report.values())


@pytest.mark.slow
def test_two_worker_processes_give_the_same_output(corpus, one_worker, tmp_path):
    prepare(from_dict(tree(corpus, tmp_path / "out", workers=2)).prepare, log=lambda *_: None)
    assert outputs(tmp_path / "out") == one_worker
    assert not (tmp_path / "out" / "work").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_without_redoing_finished_files(corpus, one_worker, tmp_path):
    out = tmp_path / "out"
    script = ("from jaxlm.config import from_dict\nfrom jaxlm.prepare import prepare\n"
              "import time, jaxlm.prepare.run as r\n"
              f"run_task = r.run_task\nr.run_task = lambda t: (time.sleep(0.5), run_task(t))[1]\n"
              f"prepare(from_dict({tree(corpus, out, workers=1)!r}).prepare)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "work" / "000003.done").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "work").glob("*.done"))
    assert 4 <= len(done) < 9

    log = []
    prepare(from_dict(tree(corpus, out, workers=1)).prepare, log=log.append)
    assert f"resuming: {len(done)} of 9 map tasks already done" in log
    assert outputs(out) == one_worker

    (out / "work").mkdir()
    (out / "work" / "plan.json").write_text("{}")  # a run of other settings: its work is not reused
    log = []
    prepare(from_dict(tree(corpus, out, workers=1)).prepare, log=log.append)
    assert not any(str(line).startswith("resuming") for line in log) and outputs(out) == one_worker


@pytest.mark.slow
def test_ray_and_the_process_pool_agree(corpus, one_worker, tmp_path):
    ray = pytest.importorskip("ray")
    prepare(from_dict(tree(corpus, tmp_path / "out", executor="ray", workers=2)).prepare, log=lambda *_: None)
    assert not ray.is_initialized()  # the instance started for the run is stopped
    assert outputs(tmp_path / "out") == one_worker
