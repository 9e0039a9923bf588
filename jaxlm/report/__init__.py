"""`jaxlm report`: what each stage of a training run did, in pictures.

`write_report(path)` reads a pipeline directory (PATH/pipeline.json, as `jaxlm pipeline` writes it)
or one run directory (PATH/metrics.jsonl; an rs run's PATH/round_R/) and writes

    PATH/report.html        one self-contained page: every figure embedded as a data: URI, inline
                            CSS, no script; a table of the stages (status, wall time, key numbers)
    PATH/figures/NAME.png   the same figures as files

A figure without data is left out, and a file that is not there yet means "not yet": the page is
refreshed after each stage of a pipeline. Numbers are the files' values (a metric's last logged one) to
4 significant digits. matplotlib (Agg, no display) is imported only when a report is drawn.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
from pathlib import Path
from typing import Optional

import yaml

from jaxlm.data.readers import jsonl_values
from jaxlm.errors import ConfigError
from jaxlm.report.figures import (LABELS, data_documents, data_drops, last, loss_curves, metric_lines, png,
                                  ppo_exact_match, reward_distributions, reward_scores, rs_loss, rs_rounds, series,
                                  task_accuracy, throughput)
from jaxlm.runs import read_metrics

SAMPLES_PER_TASK = 3


@dataclasses.dataclass
class Section:
    """What a stage shows: figures (name, caption, a matplotlib Figure or None when there is no
    data), key numbers (label, value) and more HTML (tables)."""

    figures: list = dataclasses.field(default_factory=list)
    numbers: list = dataclasses.field(default_factory=list)
    html: str = ""


# --- reading ------------------------------------------------------------------------------------


def _json(path: Path):
    """A JSON file's value, or None while it does not exist (or is being written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict]:
    """The objects of a JSONL file ([] before it exists); a line that is not JSON (yet) is skipped."""
    if not path.is_file():
        return []
    return [obj for _, obj, error in jsonl_values(path) if not error and isinstance(obj, dict)]


def _yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _metrics(run_dir: Path) -> list[dict]:
    """The rows and events of RUN_DIR/metrics.jsonl; [] before it exists."""
    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


def _event(rows: list[dict], name: str) -> dict:
    return next((r for r in reversed(rows) if r.get("event") == name), {})


def _wall(rows: list[dict]) -> Optional[float]:
    """Seconds from each session's start event to its end (a session killed without one is not counted)."""
    total, start = None, None
    for r in rows:
        if r.get("event") == "start":
            start = r.get("time")
        elif r.get("event") == "end" and start is not None and r.get("time") is not None:
            total, start = (total or 0.0) + r["time"] - start, None
    return total


def _finals(rows: list[dict], spec) -> list[tuple[str, object]]:
    """[(label, the last logged value of metric)] for spec [(label, metric)]."""
    return [(label, last(rows, name)) for label, name in spec]


def _per_task(accuracy: dict) -> str:
    return ", ".join(f"{task} {_fmt(value)}" for task, value in accuracy.items())


def _exact_match(rows: list[dict]) -> dict:
    """{task: exact match} of the last row that logged `exact_match/<task>`."""
    row = next((r for r in reversed(rows) if any(k.startswith("exact_match/") for k in r)), {})
    return {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("exact_match/")}


# --- sections, one per kind of stage ------------------------------------------------------------


def data_section(run_dir: Path, name: str = "data") -> Section:
    report = _json(run_dir / "prepared" / "report.json") or {}
    index = _json(run_dir / "tokens" / "index.json")
    sources = (report.get("sources") or {}).values()
    numbers = [("documents read", sum(s.get("read", 0) for s in sources) if sources else None),
               ("kept", sum(s.get("kept", 0) for s in sources) if sources else None),
               ("dropped", sum(sum((s.get("dropped") or {}).values()) for s in sources) if sources else None),
               ("changed", sum(sum((s.get("changed") or {}).values()) for s in sources) if sources else None),
               ("tokens", (index or {}).get("tokens")), ("shards", len((index or {}).get("shards", [])) or None)]
    return Section([(f"{name}_documents", "Documents left after each step of cleaning (prepare's report.json); "
                                         "the tokens written to the shards where their index.json exists.",
                     data_documents(report, index)),
                    (f"{name}_drops", "Documents dropped, by the rule that dropped them.", data_drops(report))],
                   numbers)


def pretrain_section(run_dir: Path, name: str = "pretrain") -> Section:
    rows = _metrics(run_dir)
    return Section([(f"{name}_loss", "Train loss (mean over each logged window) and held-out loss; token accuracy.",
                     loss_curves("Pretraining", rows)),
                    (f"{name}_throughput", "Training throughput, and model FLOPs utilisation (over "
                     "train.peak_tflops, else a measured matmul peak).", throughput(rows))],
                   _finals(rows, [("steps", "step"), ("train loss", "loss"), ("held-out loss", "eval_loss"),
                                  ("tokens/s", "tokens_per_s"), ("MFU", "mfu")])
                   + [("unigram entropy (nats)", _event(rows, "start").get("unigram_entropy_nats"))])


def sft_section(run_dir: Path, name: str = "sft") -> Section:
    rows = _metrics(run_dir)
    return Section([(f"{name}_loss", "Train and held-out loss (response tokens) and token accuracy.",
                     loss_curves("Supervised fine-tuning", rows))],
                   _finals(rows, [("steps", "step"), ("train loss", "loss"), ("held-out loss", "eval_loss"),
                                  ("held-out token accuracy", "eval_accuracy")]))


def reward_section(run_dir: Path, name: str = "reward") -> Section:
    rows, stats = _metrics(run_dir), _json(run_dir / "reward_stats.json")
    heldout = _json(run_dir / "heldout_rewards.json") or {}
    accuracy = metric_lines("Reward model", rows, [
        ("pairwise accuracy", [("train", "accuracy"), ("held-out", "eval_accuracy")]),
        ("margin (chosen - rejected)", [("train", "margin"), ("held-out", "eval_margin")])])
    return Section([(f"{name}_accuracy", "Pairwise accuracy (chosen above rejected) and reward margin.", accuracy),
                    (f"{name}_scores", "Mean reward of chosen and rejected responses over steps: the run logs their "
                     "means only, not their distributions. Right: the mean ± std of the reward over the training "
                     "responses in reward_stats.json (all responses together, not split by chosen/rejected).",
                     reward_scores(rows, stats)),
                    (f"{name}_distributions", "The rewards of the held-out groups: each group's preferred response "
                     "(chosen) against the others (rejected), after training (heldout_rewards.json).",
                     reward_distributions(heldout))],
                   _finals(rows, [("steps", "step"), ("train loss", "loss"), ("held-out loss", "eval_loss"),
                                  ("held-out accuracy", "eval_accuracy"), ("held-out margin", "eval_margin")])
                   + [("reward mean", (stats or {}).get("mean")), ("reward std", (stats or {}).get("std"))]
                   + [("held-out pairwise accuracy", _per_task(heldout["accuracy"]) if heldout.get("accuracy")
                       else None)])


def rs_section(run_dir: Path, name: str = "rs") -> Section:
    dirs = sorted((d for d in run_dir.glob("round_*") if d.name[6:].isdigit()), key=lambda d: int(d.name[6:]))
    rounds = [(_json(d / "summary.json"), _metrics(d / "sft")) for d in dirs]
    last = next((s for s, _ in reversed(rounds) if s), {})
    stats = (last.get("stats") or {}).get("all", {})
    return Section([(f"{name}_loss", "The SFT loss on each round's kept samples.", rs_loss(rounds)),
                    (f"{name}_rounds", "Left: of the samples drawn from each round's model, the share scoring "
                     "rs.min_score or more (pass@1), the share of prompts with one that does (best-of-N) and the "
                     "prompts kept. Right: exact match per task of the model after each round.", rs_rounds(rounds))],
                   [("rounds done", sum(1 for s, _ in rounds if s)), ("kept", last.get("kept")),
                    ("pairs", last.get("pairs")), ("pass@1", stats.get("pass@1")),
                    ("best-of-N", stats.get("best_of_n")), ("SFT loss", last.get("sft_loss")),
                    ("exact match (rs eval)", _per_task(last["accuracy"]) if last.get("accuracy") else None)])


def dpo_section(run_dir: Path, name: str = "dpo") -> Section:
    rows = _metrics(run_dir)
    spec = [(ylabel, [(split, prefix + metric) for split, prefix in (("train", ""), ("held-out", "eval_"))])
            for ylabel, metric in (("loss", "loss"), ("preference accuracy", "rewards/accuracy"),
                                   ("margin", "rewards/margin"))]
    spec.append(("implicit reward", [(f"{who} ({split})", f"{prefix}rewards/{who}") for split, prefix in
                                     (("train", ""), ("held-out", "eval_")) for who in ("chosen", "rejected")]))
    return Section([(f"{name}_preferences", "DPO: loss, preference accuracy (the chosen response's implicit "
                     "reward above the rejected one's), their margin, and the implicit rewards "
                     "(beta x log-ratio to the reference).", metric_lines("DPO", rows, spec))],
                   _finals(rows, [("steps", "step"), ("train loss", "loss"), ("held-out loss", "eval_loss"),
                                  ("preference accuracy (train)", "rewards/accuracy"),
                                  ("preference accuracy (held-out)", "eval_rewards/accuracy"),
                                  ("margin (held-out)", "eval_rewards/margin")]))


def ppo_section(run_dir: Path, name: str = "ppo") -> Section:
    rows = _metrics(run_dir)
    algorithm = _event(rows, "start").get("algorithm", "ppo")
    scores = [("score", "score")] + ([("correct", "correct")] if series(rows, "correct") != series(rows, "score")
                                     else [])
    spec = [("score", scores), ("KL to the reference", [("KL", "kl")]),
            ("entropy", [("entropy", "entropy")]), ("clip fraction", [("clip fraction", "clip_frac")])]
    tasks = _exact_match(rows)
    return Section([(f"{name}_training", "Per iteration: mean score of the sampled responses, KL of the policy to "
                     "the reference (per response), entropy and the share of clipped tokens.",
                     metric_lines(f"{algorithm.upper()}", rows, spec, xlabel="iteration")),
                    (f"{name}_exact_match", "Exact match per task, as the run evaluated it.",
                     ppo_exact_match(rows, f"{algorithm.upper()}: exact match", list(tasks)))],
                   [("algorithm", algorithm)]
                   + _finals(rows, [("iterations", "step"), ("score", "score"), ("KL to the reference", "kl"),
                                    ("entropy", "entropy"), ("clip fraction", "clip_frac")])
                   + [("exact match (run's eval)", _per_task(tasks) if tasks else None)])


def eval_section(run_dir: Path, name: str = "eval") -> Section:
    accuracy = _json(run_dir / "accuracy.json") or {}
    samples = _jsonl(run_dir / "samples.jsonl")
    stages = accuracy.get("stages") or {}
    tasks = accuracy.get("tasks") or list(dict.fromkeys(t for a in stages.values() for t in a))
    table = _table(["model", *tasks], [[LABELS.get(s, s), *(a.get(t) for t in tasks)] for s, a in stages.items()])
    return Section([(f"{name}_accuracy", f"Exact match per task ({accuracy.get('examples', '?')} problems each) of "
                     "each stage's model, greedy decoding.", task_accuracy(accuracy))],
                   [("tasks", len(tasks) or None), ("problems per task", accuracy.get("examples")),
                    ("sample prompts", len(samples) or None)],
                   (table if stages else "") + _samples_table(samples))


SECTIONS = {"data": data_section, "pretrain": pretrain_section, "sft": sft_section, "reward": reward_section,
            "rs": rs_section, "dpo": dpo_section, "ppo": ppo_section, "eval": eval_section}


# --- html ----------------------------------------------------------------------------------------

CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;
vertical-align:top}th{background:#f2f2f2}td.text{white-space:pre-wrap;font-family:ui-monospace,monospace}
ul{margin:0;padding-left:1.1em}figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:13px}
.muted{color:#888}"""


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds) -> str:
    if seconds is None:
        return "—"
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s"
    return f"{s // 60} min {s % 60} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60} min"


class Markup(str):
    """HTML made here, not to be escaped again."""


def _table(header, rows, classes=None) -> str:
    """An HTML table; cells are escaped (numbers formatted) unless they are `Markup`."""
    def cell(i, v):
        css = f' class="{classes[i]}"' if classes and classes[i] else ""
        return f"<td{css}>{v if isinstance(v, Markup) else html.escape(_fmt(v))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _samples_table(samples: list[dict]) -> str:
    """The first SAMPLES_PER_TASK prompts of each task, and each stage's output."""
    picked, per_task = [], {}
    for s in samples:
        per_task[s.get("task")] = per_task.get(s.get("task"), 0) + 1
        if per_task[s.get("task")] <= SAMPLES_PER_TASK:
            picked.append(s)
    if not picked:
        return ""
    stages = list(dict.fromkeys(k for s in picked for k in (s.get("outputs") or {})))
    rows = [[s.get("task"), s.get("prompt"), s.get("answer"), *((s.get("outputs") or {}).get(k) for k in stages)]
            for s in picked]
    return (f"<h3>Sample generations</h3><p>The first {SAMPLES_PER_TASK} prompts of each task in samples.jsonl, "
            "and each stage's greedy output.</p>"
            + _table(["task", "prompt", "answer", *(LABELS.get(k, k) for k in stages)], rows,
                     [None, "text", "text", *(["text"] * len(stages))]))


def _numbers(numbers) -> Markup:
    items = [f"<li>{html.escape(label)}: {html.escape(_fmt(v))}</li>" for label, v in numbers if v is not None]
    return Markup(f"<ul>{''.join(items)}</ul>" if items else '<span class="muted">—</span>')


def _page(title: str, stage_rows: list, sections: list[tuple[str, Section]], figures: dict) -> str:
    """The page: the stages' table, then each stage's figures (embedded PNGs) and tables."""
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
             f"<p class=\"muted\">written {datetime.datetime.now().isoformat(timespec='seconds')}</p>"
             "<h2>Stages</h2>", _table(["stage", "status", "wall time", "key numbers"], stage_rows)]
    for name, section in sections:
        drawn = [(f, c) for f, c, _ in section.figures if f in figures]
        if not drawn and not section.html:
            continue
        parts.append(f"<h2 id=\"{html.escape(name)}\">{html.escape(name)}</h2>")
        for fig_name, caption in drawn:
            data = base64.b64encode(figures[fig_name]).decode("ascii")
            parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(fig_name)}\" "
                         f"data-file=\"figures/{html.escape(fig_name)}.png\"><figcaption>{html.escape(caption)}"
                         "</figcaption></figure>")
        parts.append(section.html)
    return "".join(parts) + "</body></html>\n"


# --- the shell -----------------------------------------------------------------------------------


def run_kind(run_dir: Path, rows: list[dict]) -> Optional[str]:
    """The stage a run directory holds: an rs run's rounds, the stage its start event names, else by
    the metrics it logs (pretraining and SFT log the same ones: pretrain)."""
    if (run_dir / "round_0").is_dir():
        return "rs"
    stage = _event(rows, "start").get("stage")
    if stage in SECTIONS:
        return stage
    names = {k for r in rows if "event" not in r for k in r}
    for kind, marker in (("ppo", "clip_frac"), ("dpo", "rewards/accuracy"), ("reward", "reward_chosen"),
                         ("pretrain", "loss")):
        if marker in names:
            return kind
    return None


def _pipeline(path: Path, spec: dict):
    """The stages' table rows and sections of a pipeline directory."""
    stages, sections, accuracy = [], [], {}
    for stage in spec.get("stages") or []:
        name, status = str(stage.get("name", "?")), stage.get("status")
        kind = stage.get("kind") or name
        run_dir = Path(stage.get("run_dir") or path / name)
        run_dir = run_dir if run_dir.is_absolute() or run_dir.exists() else path / run_dir
        shown = "not run yet" if status in ("pending", None) else status
        section = SECTIONS[kind](run_dir, name) if shown != "not run yet" and kind in SECTIONS else Section()
        if kind == "eval":
            accuracy = (_json(run_dir / "accuracy.json") or {}).get("stages") or {}
        stages.append((name, shown, stage.get("wall_s"), section))
        sections.append((name, section))
    rows = [[name, status, _duration(wall), _numbers(section.numbers + (  # the eval stage's exact match of its model
        [("exact match (eval)", _per_task(accuracy[name]))] if name in accuracy else []))]
        for name, status, wall, section in stages]
    return rows, sections


def _run(path: Path, rows: list[dict]):
    """The stages' table row and section of one run directory."""
    kind = run_kind(path, rows)
    if kind is None:
        return [[path.name, "not run yet", "—", _numbers([])]], []
    section = SECTIONS[kind](path, kind)
    if kind == "rs":
        rounds = ((_yaml(path / "config.yaml") or {}).get("rs") or {}).get("rounds")
        done = dict(section.numbers)["rounds done"]
        status = f"{done} of {rounds} rounds" if rounds else f"{done} rounds"
    else:
        last = next((r["event"] for r in reversed(rows) if r.get("event") in ("start", "end")), None)
        status = "finished" if last == "end" else "unfinished"
    return [[kind, status, _duration(_wall(rows)), _numbers(section.numbers)]], [(kind, section)]


def write_report(path) -> Path:
    """Draw what a pipeline directory (pipeline.json) or one run directory (metrics.jsonl, or an rs
    run's round_R/) holds: PATH/report.html and PATH/figures/*.png. Returns the page's path."""
    path = Path(path)
    spec = _json(path / "pipeline.json") if path.is_dir() else None
    if spec is None and (path / "pipeline.json").is_file():
        raise ConfigError(f"{str(path / 'pipeline.json')!r} is not valid JSON (is it being written? try again)")
    is_run = path.is_dir() and ((path / "metrics.jsonl").is_file() or (path / "round_0").is_dir())
    if spec is None and not is_run:
        raise ConfigError(f"{str(path)!r} is neither a pipeline directory (with pipeline.json) nor a run directory "
                          "(with metrics.jsonl); give one of those")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("jaxlm report draws with matplotlib, which is not installed (pip install matplotlib)") \
            from None
    if spec is not None:
        stage_rows, sections = _pipeline(path, spec)
        title = f"jaxlm pipeline: {spec.get('dir') or path}"
    else:
        stage_rows, sections = _run(path, _metrics(path))
        title = f"jaxlm run: {path}"
    figures = {}
    for _, section in sections:
        for name, _, fig in section.figures:
            if fig is not None:
                figures[name] = png(fig)
    fig_dir = path / "figures"
    fig_dir.mkdir(exist_ok=True)
    for old in fig_dir.glob("*.png"):  # a figure this report no longer draws
        if old.stem not in figures:
            old.unlink()
    for name, data in figures.items():
        (fig_dir / f"{name}.png").write_bytes(data)
    out = path / "report.html"
    tmp = out.with_suffix(".html.tmp")  # a reader never sees half a page
    tmp.write_text(_page(title, stage_rows, sections, figures), encoding="utf-8")
    tmp.replace(out)
    return out
