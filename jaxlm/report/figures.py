"""The report's figures (matplotlib's Agg canvas, imported when a figure is drawn): one function per
figure, each None when it has no data, and the line-plot helpers they share."""
from __future__ import annotations

import io
from typing import Optional

DPI = 90
LABELS = {"pretrain": "base", "sft": "SFT", "rs": "RS", "dpo": "DPO", "ppo": "PPO"}  # a model by its stage
SMOOTH = 60  # a curve of more points than this (e.g. PPO's score per iteration) is drawn under its running mean


def series(rows: list[dict], name: str) -> tuple[list, list]:
    """(steps, values) of the rows that logged `name` (a value that was not finite is null: left out)."""
    pts = [(r["step"], r[name]) for r in rows if "event" not in r and r.get(name) is not None and "step" in r]
    return [s for s, _ in pts], [v for _, v in pts]


def last(rows: list[dict], name: str):
    """The last logged value of `name`, or None."""
    return next((v for v in reversed(series(rows, name)[1])), None)


def _figure(panels: int):
    """A figure of `panels` axes (2 x 2 for four, else up to 3 in a row) and the axes."""
    from matplotlib.figure import Figure

    ncols = 2 if panels == 4 else min(panels, 3)
    nrows = -(-panels // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.1 * nrows), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[panels:]:
        ax.remove()
    for ax in axes[:panels]:
        ax.grid(alpha=0.3)
    return fig, axes[:panels]


def png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def lines(title: str, panels, xlabel: str = "step"):
    """Line plots, one panel per (ylabel, [(label, (xs, ys))]); a curve without points and a panel
    without curves are left out; None when nothing is left."""
    panels = [(ylabel, [(label, xy) for label, xy in curves if xy[0]]) for ylabel, curves in panels]
    panels = [(ylabel, curves) for ylabel, curves in panels if curves]
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (ylabel, curves) in zip(axes, panels):
        for label, (xs, ys) in curves:
            if len(xs) <= SMOOTH:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 20 else None, markersize=3)
            else:  # a noisy curve: faint, under its running mean
                n = len(xs) // 12
                line, = ax.plot(xs, ys, alpha=0.3, linewidth=0.8)
                ax.plot(xs[n - 1:], _running_mean(ys, n), color=line.get_color(), label=f"{label} (mean of {n})")
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if len(curves) > 3:  # beside the axes, where it hides no curve
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
        elif len(curves) > 1 or len(curves[0][1][0]) > SMOOTH:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def _running_mean(ys: list, n: int) -> list:
    import numpy as np

    return list(np.convolve(np.asarray(ys, float), np.ones(n) / n, mode="valid"))


def metric_lines(title: str, rows: list[dict], spec, xlabel: str = "step"):
    """`lines` of logged metrics: spec is [(ylabel, [(label, metric name)])]."""
    return lines(title, [(ylabel, [(label, series(rows, name)) for label, name in curves])
                         for ylabel, curves in spec], xlabel)


def loss_curves(title: str, rows: list[dict]):
    return metric_lines(title, rows, [("loss", [("train", "loss"), ("held-out", "eval_loss")]),
                                      ("token accuracy", [("train", "accuracy"), ("held-out", "eval_accuracy")])])


def throughput(rows: list[dict]):
    return metric_lines("Pretraining throughput", rows, [("tokens / s", [("tokens/s", "tokens_per_s")]),
                                                         ("MFU", [("MFU", "mfu")])])


def _cleaning_steps(sources: dict) -> list[tuple[str, int]]:
    """(step, documents left) of prepare's report, over all sources: read, then after each step that
    dropped some (reading, the rules, exact, near-duplicate and repeated-span dedup), then kept."""
    by_step = dict.fromkeys(["readable", "passed\nrules", "exact\ndedup", "near\ndedup", "span\ndedup"], 0)
    dedup = {"dedup.exact": "exact\ndedup", "dedup.minhash": "near\ndedup", "dedup.suffix_array_empty": "span\ndedup"}
    for s in sources.values():
        for reason, n in (s.get("dropped") or {}).items():
            by_step[dedup.get(reason) or ("readable" if reason.startswith("read.") else "passed\nrules")] += n
    left = sum(s.get("read", 0) for s in sources.values())
    out = [("read", left)]
    for step, n in by_step.items():
        left -= n
        if n:
            out.append((step, left))
    return out + [("kept", sum(s.get("kept", 0) for s in sources.values()))]


def data_documents(report: dict, index: Optional[dict]):
    """Documents left after each step of cleaning (all sources); the tokens of the shards where known."""
    if not report.get("sources"):
        return None
    steps, counts = zip(*_cleaning_steps(report["sources"]))
    fig, (ax,) = _figure(1)
    ax.bar(steps, counts)
    for i, n in enumerate(counts):
        ax.annotate(f"{n:,}", (i, n), ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="documents", ylim=(0, max(counts) * 1.12 or 1))
    ax.tick_params(axis="x", labelsize=8)
    tokens = (index or {}).get("tokens")
    fig.suptitle("Documents through cleaning" + (f"\n(kept: {tokens:,} tokens)" if tokens is not None else ""))
    return fig


def data_drops(report: dict):
    """Documents dropped by each rule, stacked by source."""
    sources = report.get("sources") or {}
    totals = {}
    for s in sources.values():
        for reason, n in (s.get("dropped") or {}).items():
            totals[reason] = totals.get(reason, 0) + n
    if not totals:
        return None
    reasons = sorted(totals, key=totals.get)
    fig, (ax,) = _figure(1)
    left = [0] * len(reasons)
    for name, s in sources.items():
        counts = [(s.get("dropped") or {}).get(r, 0) for r in reasons]
        ax.barh(reasons, counts, left=left, label=name)
        left = [a + b for a, b in zip(left, counts)]
    ax.set(xlabel="documents dropped")
    ax.tick_params(axis="y", labelsize=8)
    if len(sources) > 1:
        ax.legend(fontsize=8)
    fig.suptitle("Drops by rule")
    return fig


def task_accuracy(accuracy: dict):
    """Grouped bars: exact match per task after each stage."""
    stages = accuracy.get("stages") or {}
    tasks = accuracy.get("tasks") or list(dict.fromkeys(t for a in stages.values() for t in a))
    if not stages or not tasks:
        return None
    fig, (ax,) = _figure(1)
    fig.set_size_inches(max(4.2, 1.3 * len(tasks) + 1.5), 3.1)
    width = 0.8 / len(stages)
    for i, (stage, acc) in enumerate(stages.items()):
        ax.bar([j - 0.4 + width * (i + 0.5) for j in range(len(tasks))], [acc.get(t, 0) for t in tasks], width,
               label=LABELS.get(stage, stage))
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(ylabel="exact match", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    fig.suptitle("Exact match per task after each stage")
    return fig


def reward_scores(rows: list[dict], stats: Optional[dict]):
    """Mean reward of chosen and rejected responses over steps, and the summary the run keeps."""
    curves = [(f"{who} ({split})", series(rows, f"{prefix}reward_{who}"))
              for split, prefix in (("train", ""), ("held-out", "eval_")) for who in ("chosen", "rejected")]
    curves = [c for c in curves if c[1][0]]
    if not curves and not stats:
        return None
    fig, axes = _figure(int(bool(curves)) + int(bool(stats)))
    if curves:
        for label, (xs, ys) in curves:
            axes[0].plot(xs, ys, label=label, linestyle="--" if "train" in label else "-",
                         marker="o" if len(xs) <= 20 else None, markersize=3)
        axes[0].set(xlabel="step", ylabel="mean reward")
        axes[0].legend(fontsize=8)
    if stats:
        ax = axes[-1]
        ax.bar([0], [stats.get("mean", 0)], yerr=[stats.get("std", 0)], capsize=6, width=0.5)
        ax.set_xticks([0], [f"{stats.get('responses', '?')} training\nresponses"])
        ax.set(ylabel="reward (mean ± std)", xlim=(-1, 1))
    fig.suptitle("Rewards")
    return fig


def reward_distributions(heldout: Optional[dict]):
    """Histograms of the held-out rewards: each group's best response (chosen) against the others."""
    groups = (heldout or {}).get("groups") or []
    chosen = [g["rewards"][0] for g in groups if len(g.get("rewards") or []) > 1]
    rejected = [r for g in groups if len(g.get("rewards") or []) > 1 for r in g["rewards"][1:]]
    if not chosen:
        return None
    fig, (ax,) = _figure(1)
    lo, hi = min(chosen + rejected), max(chosen + rejected)
    bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
    ax.hist(rejected, bins=bins, alpha=0.6, label=f"rejected ({len(rejected)})")
    ax.hist(chosen, bins=bins, alpha=0.6, label=f"chosen ({len(chosen)})")
    ax.set(xlabel="reward", ylabel="responses")
    ax.legend(fontsize=8)
    fig.suptitle("Held-out rewards")
    return fig


def ppo_exact_match(rows: list[dict], title: str, tasks: list):
    """Exact match per task over iterations, where the run evaluated it twice or more (once: its numbers)."""
    curves = [(t, series(rows, f"exact_match/{t}")) for t in tasks]
    return lines(title, [("exact match", curves)], xlabel="iteration") if any(
        len(xs) > 1 for _, (xs, _) in curves) else None


def rs_loss(rounds: list[tuple[dict, list]]):
    """The SFT loss of each round, one after another on one axis of steps."""
    curves, offset = [], 0
    for i, (_, rows) in enumerate(rounds):
        for label, name in (("", "loss"), (" held-out", "eval_loss")):
            xs, ys = series(rows, name)
            curves.append((f"round {i}{label}", ([offset + x for x in xs], ys)))
        offset += last(rows, "step") or 0
    return lines("Rejection sampling: SFT loss per round", [("loss", curves)], xlabel="step (rounds in a row)")


def rs_rounds(rounds: list[tuple[dict, list]]):
    """Per round: pass@1, best-of-N and the share kept of the samples from the round's model, and exact
    match per task after it (x: the rounds of SFT the model had)."""
    summaries = [s for s, _ in rounds if s]
    share = [(label, ([s["round"] for s in summaries], [f(s) for s in summaries])) for label, f in (
        ("pass@1", lambda s: s["stats"]["all"]["pass@1"]), ("best-of-N", lambda s: s["stats"]["all"]["best_of_n"]),
        ("kept / prompts", lambda s: s["kept"] / max(s["prompts"], 1)))]
    points = [(0, s["accuracy_before"]) for s in summaries if s.get("accuracy_before")]
    points += [(s["round"] + 1, s["accuracy"]) for s in summaries if s.get("accuracy")]
    tasks = list(dict.fromkeys(t for _, acc in points for t in acc))
    exact = [(t, ([x for x, acc in points if t in acc], [acc[t] for _, acc in points if t in acc])) for t in tasks]
    return lines("Rejection sampling rounds", [("share", share), ("exact match", exact)], xlabel="rounds of SFT done")
