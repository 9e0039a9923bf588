"""`jaxlm report`: one self-contained page whose images are the PNGs beside it, numbers that are
the logged ones, stages not yet run said so, no empty figure, and sample text escaped."""
import base64
import json
import struct
from html.parser import HTMLParser

import pytest

from jaxlm.errors import ConfigError
from jaxlm.report import write_report
from jaxlm.runs import MetricsWriter, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ["add", "reverse", "sort", "recall"]


class Page(HTMLParser):
    """The images, tables (rows of cell texts; list items on lines of their own) and tags of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs, self.tables, self.tags, self.text, self._cell = [], [], [], [], False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")
            self._cell = True
        elif tag == "li" and self._cell:
            self.tables[-1][-1][-1] += "\n"

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = False

    def handle_data(self, data):
        self.text.append(data)
        if self._cell:
            self.tables[-1][-1][-1] += data

    def stages(self) -> dict:
        """{stage: (status, wall time, {label: value})} of the stages' table."""
        header, *rows = self.tables[0]
        assert header == ["stage", "status", "wall time", "key numbers"]
        return {r[0]: (r[1], r[2], dict(item.split(": ", 1) for item in r[3].split("\n") if ": " in item))
                for r in rows}


def _run(run_dir, rows, stage=None, end=True):
    """A run directory written by the real metrics writer: a start event, `rows`, an end event."""
    log = MetricsWriter(run_dir)
    if stage:
        log.event("start", stage=stage, step=0)
    for row in rows:
        log.scalars(row)
    if end:
        log.event("end", step=rows[-1]["step"] if rows else 0)
    log.close()
    return run_dir


def _pretrain_rows(steps=4):
    rows = [{"step": 10 * s, "loss": 6.0 / s + 0.123456, "accuracy": 0.05 * s, "tokens_per_s": 1234.5678 * s,
             "mfu": 0.0312 * s, "lr": 1e-3} for s in range(1, steps + 1)]
    return rows + [{"step": 10 * steps, "eval_loss": 2.7253034114, "eval_accuracy": 0.3472290039}]


def _data(data_dir):
    (data_dir / "prepared").mkdir(parents=True)
    (data_dir / "prepared" / "report.json").write_text(json.dumps({"sources": {"stdlib": {
        "read": 1790, "kept": 1571, "dropped": {"min_words.too_few": 119, "read.empty": 28, "dedup.minhash": 35,
                                                "pii.too_many": 33, "read.invalid_utf8": 4},
        "changed": {"pii.scrubbed": 199}}}, "seconds": 7.8}))
    (data_dir / "tokens").mkdir()
    (data_dir / "tokens" / "index.json").write_text(json.dumps({"documents": 1571, "tokens": 17993925,
                                                                "shards": [{"path": "shard-00000.array_record"}]}))


def _accuracy():
    return {"tasks": TASKS, "examples": 100, "stages": {
        stage: {t: round(0.1 * i + 0.03 * j, 2) for j, t in enumerate(TASKS)}
        for i, stage in enumerate(["pretrain", "sft", "rs", "dpo", "ppo"])}}


def _pipeline(root, status: dict):
    """A pipeline directory; every stage in `status` that is not pending gets its files."""
    made = {
        "data": lambda d: _data(d),
        "pretrain": lambda d: _run(d, _pretrain_rows(), "pretrain"),
        "sft": lambda d: _run(d, [{"step": 20, "loss": 1.5, "accuracy": 0.5},
                                  {"step": 40, "loss": 0.2352292102, "accuracy": 0.9},
                                  {"step": 40, "eval_loss": 0.2870095681, "eval_accuracy": 0.8895781637}], "sft"),
        "reward": lambda d: (_run(d, [{"step": s, "loss": 0.9 / s, "accuracy": 0.5 + 0.1 * s, "margin": 0.3 * s,
                                       "reward_chosen": 0.5 * s, "reward_rejected": -0.5 * s} for s in (1, 2, 3)]
                                  + [{"step": 3, "eval_accuracy": 0.8355555555, "eval_margin": 5.1791059027,
                                      "eval_reward_chosen": 3.58, "eval_reward_rejected": -1.59}], "reward"),
                             (d / "reward_stats.json").write_text('{"mean": 1.2568867, "std": 5.4936352, '
                                                                  '"responses": 2262}'),
                             (d / "heldout_rewards.json").write_text(json.dumps({
                                 "accuracy": {"all": 0.75, "add": 0.5, "sort": 1.0},
                                 "groups": [{"task": t, "rewards": [c, r]} for t, c, r in
                                            (("add", 1.0, 2.0), ("add", 3.0, -1.0), ("sort", 2.5, 0.1),
                                             ("sort", 4.0, -2.0))]}))),
        "rs": _rs,
        "dpo": lambda d: _run(d, [{"step": s, "loss": 0.7 - 0.1 * s, "rewards/accuracy": 0.7 + 0.05 * s,
                                   "rewards/margin": 0.2 * s, "rewards/chosen": -0.01 * s,
                                   "rewards/rejected": -0.2 * s} for s in (1, 2)]
                              + [{"step": 2, "eval_loss": 0.4402591884, "eval_rewards/accuracy": 0.859375,
                                  "eval_rewards/margin": 0.8150249719}], "dpo"),
        "ppo": lambda d: _run(d, [{"step": s, "score": 0.5 + 0.01 * s, "kl": 0.01 * s, "entropy": 0.3 - 0.001 * s,
                                   "clip_frac": 0.02 / s, "correct": 0.5 + 0.01 * s} for s in range(1, 6)]
                              + [{"step": 5, **{f"exact_match/{t}": 0.25 for t in TASKS}}], "ppo"),
        "eval": _eval,
    }
    stages = []
    for name, st in status.items():
        if st != "pending":
            (root / name).mkdir(parents=True, exist_ok=True)
            made[name](root / name)
        stages.append({"name": name, "kind": name, "run_dir": str(root / name), "status": st,
                       "wall_s": None if st == "pending" else 12.5})
    (root / "pipeline.json").write_text(json.dumps({"dir": str(root), "stages": stages}))
    return root


def _rs(d):
    for r in (0, 1):
        (d / f"round_{r}").mkdir()
        (d / f"round_{r}" / "summary.json").write_text(json.dumps({
            "round": r, "prompts": 2000, "kept": 1661 + r, "pairs": 949 + r, "sft_loss": 0.1131802042 + r,
            "stats": {"all": {"pass@1": 0.56275 + 0.01 * r, "best_of_n": 0.8305 + 0.01 * r}},
            "accuracy": {t: 0.5 for t in TASKS}}))
        _run(d / f"round_{r}" / "sft", [{"step": s, "loss": 0.15 - 0.01 * s} for s in (20, 40)], "sft")


def _eval(d):
    (d / "accuracy.json").write_text(json.dumps(_accuracy()))
    (d / "samples.jsonl").write_text("".join(json.dumps({
        "task": "sort", "prompt": f"Sort <b>{i}</b> & 2", "answer": "2 <i>",
        "outputs": {"pretrain": "<script>x</script>", "ppo": "2 <i>"}}) + "\n" for i in range(2)))


def _page(path):
    html_path = write_report(path)
    assert html_path == path / "report.html"
    return Page(html_path.read_text())


def _png_size(data: bytes):
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


ALL = ["data", "pretrain", "sft", "reward", "rs", "dpo", "ppo", "eval"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished pipeline's directory, and its report's page."""
    root = _pipeline(tmp_path_factory.mktemp("report") / "pipe", dict.fromkeys(ALL, "finished"))
    return root, _page(root)


def test_every_image_is_an_embedded_png_and_the_same_as_its_file(finished):
    root, page = finished
    files = {p.name: p.read_bytes() for p in (root / "figures").iterdir()}
    assert {f"{s}.png" for s in ("data_documents", "data_drops", "pretrain_loss", "pretrain_throughput",
                                 "sft_loss", "reward_accuracy", "reward_scores", "reward_distributions", "rs_loss",
                                 "rs_rounds",
                                 "dpo_preferences", "ppo_training", "eval_accuracy")} == set(files)
    assert len(page.imgs) == len(files)
    for img in page.imgs:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        data = base64.b64decode(img["src"][len(prefix):], validate=True)
        width, height = _png_size(data)
        assert width > 100 and height > 100
        assert data == files[img["data-file"].removeprefix("figures/")]
    # self-contained: nothing is fetched and nothing runs
    assert not {"script", "link", "iframe"} & set(page.tags)
    assert all(img["src"].startswith("data:") for img in page.imgs)


def test_key_numbers_are_the_logged_values(finished):
    root, page = finished
    stages = page.stages()
    assert list(stages) == ALL and all(status == "finished" for status, _, _ in stages.values())
    assert stages["pretrain"][1] == "12.5 s"

    def last(stage, name):
        return [r[name] for r in read_metrics(root / stage) if r.get(name) is not None][-1]

    expected = {"pretrain": {"train loss": last("pretrain", "loss"), "held-out loss": last("pretrain", "eval_loss"),
                             "tokens/s": last("pretrain", "tokens_per_s"), "MFU": last("pretrain", "mfu")},
                "sft": {"train loss": last("sft", "loss"), "held-out loss": last("sft", "eval_loss")},
                "reward": {"held-out accuracy": last("reward", "eval_accuracy"),
                           "held-out margin": last("reward", "eval_margin"),
                           **{f"reward {k}": json.loads((root / "reward" / "reward_stats.json").read_text())[k]
                              for k in ("mean", "std")}},
                "dpo": {"preference accuracy (held-out)": last("dpo", "eval_rewards/accuracy"),
                        "margin (held-out)": last("dpo", "eval_rewards/margin")},
                "ppo": {"score": last("ppo", "score"), "KL to the reference": last("ppo", "kl")},
                "rs": {"SFT loss": json.loads((root / "rs" / "round_1" / "summary.json").read_text())["sft_loss"]}}
    for stage, numbers in expected.items():
        shown = stages[stage][2]
        for label, value in numbers.items():
            assert float(shown[label].replace(",", "")) == pytest.approx(value, rel=5e-4), (stage, label)
    assert stages["reward"][2]["held-out pairwise accuracy"] == "all 0.75, add 0.5, sort 1"
    assert stages["data"][2]["kept"] == "1,571" and stages["data"][2]["tokens"] == "17,993,925"
    assert stages["pretrain"][2]["steps"] == "40" and stages["rs"][2]["rounds done"] == "2"

    accuracy = _accuracy()["stages"]
    for stage in accuracy:  # the eval stage's exact match, in each stage's row and in its own table
        parts = dict(p.split(" ") for p in stages[stage][2]["exact match (eval)"].split(", "))
        assert {t: float(v) for t, v in parts.items()} == accuracy[stage]
    table = next(t for t in page.tables if t[0][0] == "model")
    assert table[0] == ["model", *TASKS]
    assert [r[0] for r in table[1:]] == ["base", "SFT", "RS", "DPO", "PPO"]
    assert [[float(v) for v in r[1:]] for r in table[1:]] == [[a[t] for t in TASKS] for a in accuracy.values()]


def test_a_partial_pipeline_says_what_has_not_run_yet(tmp_path):
    status = {"data": "finished", "pretrain": "running", **dict.fromkeys(ALL[2:], "pending")}
    root = _pipeline(tmp_path / "pipe", status)
    with open(root / "pretrain" / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "loss": 2.')  # the running stage is writing a line
    stages = _page(root).stages()
    assert stages["pretrain"][0] == "running" and stages["pretrain"][2]["train loss"]
    assert all(stages[s][:2] == ("not run yet", "—") for s in ALL[2:])
    assert {p.stem for p in (root / "figures").iterdir()} == {"data_documents", "data_drops", "pretrain_loss",
                                                              "pretrain_throughput"}

    # the next refresh: sft finished, but its directory is gone, and the eval stage wrote nothing yet
    spec = json.loads((root / "pipeline.json").read_text())
    for stage in spec["stages"]:
        stage["status"] = {"pretrain": "finished", "sft": "finished", "eval": "running"}.get(stage["name"],
                                                                                             stage["status"])
    (root / "pipeline.json").write_text(json.dumps(spec))
    stages = _page(root).stages()
    assert stages["sft"][0] == "finished" and stages["sft"][2] == {}
    assert stages["eval"][0] == "running" and not (root / "figures" / "eval_accuracy.png").exists()


@pytest.mark.parametrize("kind, stage, rows, figures", [
    ("pretrain", "pretrain", [{"step": s, "loss": 3.0 / s} for s in (1, 2, 3)], {"pretrain_loss"}),
    ("pretrain", "pretrain", [{"step": 1, "loss": float("nan")}, {"step": 2, "loss": 2.5}], {"pretrain_loss"}),
    ("dpo", None, [{"step": s, "loss": 0.6, "rewards/accuracy": 0.8, "rewards/margin": 0.1 * s} for s in (1, 2)],
     {"dpo_preferences"}),
    ("reward", "reward", [{"step": s, "loss": 0.6, "accuracy": 0.7} for s in (1, 2)], {"reward_accuracy"}),
    ("ppo", None, [{"step": s, "score": 0.5, "kl": 0.1, "clip_frac": 0.01} for s in (1, 2)], {"ppo_training"}),
])
def test_a_run_directory_gets_the_figures_of_its_kind_that_have_data(tmp_path, kind, stage, rows, figures):
    run_dir = _run(tmp_path / "run", rows, stage)
    page = _page(run_dir)
    assert {p.stem for p in (run_dir / "figures").iterdir()} == figures
    assert {img["data-file"] for img in page.imgs} == {f"figures/{f}.png" for f in figures}
    (row_kind, (status, _, numbers)), = page.stages().items()
    assert row_kind == kind and status == "finished"
    label, name = ("score", "score") if kind == "ppo" else ("train loss", "loss")
    logged = [r[name] for r in read_metrics(run_dir) if r.get(name) is not None]  # a NaN is logged as null
    assert float(numbers[label]) == pytest.approx(logged[-1], rel=5e-4)


def test_a_path_that_holds_no_run_is_refused_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "missing", tmp_path / "empty", tmp_path / "file"):
        with pytest.raises(ConfigError, match=str(path)) as e:
            write_report(path)
        assert "\n" not in str(e.value) and "pipeline.json" in str(e.value) and "metrics.jsonl" in str(e.value)
    assert not (tmp_path / "empty" / "report.html").exists()


def test_sample_text_is_escaped(tmp_path):
    root = _pipeline(tmp_path / "pipe", {"eval": "finished"})
    page = _page(root)
    assert not {"b", "i", "script"} & set(page.tags)
    samples = next(t for t in page.tables if t[0][:3] == ["task", "prompt", "answer"])
    assert samples[0] == ["task", "prompt", "answer", "base", "PPO"]
    assert samples[1] == ["sort", "Sort <b>0</b> & 2", "2 <i>", "<script>x</script>", "2 <i>"]
