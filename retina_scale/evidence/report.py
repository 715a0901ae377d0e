"""The resolution report of a stepwise run: Li et al.'s tables and figures, for any data.

``write_report(run_dir, out)`` reads a finished run (``report.json``, each stage's ``state.json`` and
``evaluation.json``) and, when given, the from-scratch control and the throughput measurement of a
resolution study (:mod:`retina_scale.evidence.study`), and writes into ``out``::

    REPORT.md            the tables and figures with a plain reading of them
    report.json          the same numbers for machines
    figures/val_loss.png          validation loss per epoch, one curve per stage (the paper's Fig. 2)
    figures/confusion.png         the last stage's test confusion matrix with counts (Fig. 3)
    figures/complexity.png        weights, multiply-adds, activations per stage, log scale (Fig. 4)
    figures/kappa_vs_stage.png    test kappa per stage with 95 % intervals, marker area ~ weights (Fig. 5)
    figures/stepwise_vs_scratch.png  validation kappa against training time, ladder and scratch
    figures/roc.png               test ROC curve for referable DR per stage, the last stage's operating points
                                  and Gulshan et al.'s two EyePACS-1 points

Nothing here needs TensorFlow except the complexity counts (Keras builds each stage once).

Example (it needs a trained run, so it is not run as a doctest)::

    summary = write_report("runs/quick", "runs/quick/report")
    summary["stages"][-1]["test_kappa"]["value"]
"""

from __future__ import annotations

import math
import platform
from pathlib import Path

from retina_scale.run_layout import ReportLayout, RunLayout
from retina_scale.utils.fileio import atomic_path, write_json
from retina_scale.utils.fileio import read_json as _read_json
from retina_scale.utils.fileio import write_text as _write_text
from retina_scale.utils.tables import markdown_table, text_table

# The paper's Table III (EyePACS test set, full width, 200 epochs per stage).
PAPER_TABLE_III = {"tiny": 0.63978, "small": 0.77646, "median": 0.83879, "large": 0.85114}
# The paper's Table IV for its large model: (precision, recall, F1).
PAPER_TABLE_IV = {"no_dr": (0.932, 0.943, 0.938), "any_dr": (0.842, 0.815, 0.829), "mild_dr": (0.466, 0.312, 0.370)}
ROW_LABELS = {"no_dr": "No DR", "any_dr": "Any DR", "mild_dr": "Mild DR"}


def load_run(run_dir) -> dict:
    """A finished stepwise run as one dict: ``report`` (report.json), ``config`` (config.yaml as a
    dict) and ``stages``: per stage the report row plus ``history`` (epochs) and ``evaluation``.

    Raises:
        FileNotFoundError: ``run_dir`` is not a finished run (no report.json) or lacks a stage's state.
    """
    import yaml

    run = RunLayout(run_dir)
    if not run.root.is_dir():
        raise FileNotFoundError(f"no such run folder: {run.root}")
    if not run.report_json.exists():
        raise FileNotFoundError(f"{run.root} holds no finished stepwise run (no report.json); train it first "
                                "with 'retina-scale train' or 'python scripts/stepwise.py'")
    report = _read_json(run.report_json)
    config = yaml.safe_load(run.config.read_text(encoding="utf-8")) if run.config.exists() else {}
    stages = []
    for row in report["stages"]:
        stage = run.stage(row["index"], row["stage"])
        if not stage.state.exists():
            raise FileNotFoundError(f"{run.root}: stage {row['stage']} has no state.json in {stage.dir}")
        state = _read_json(stage.state)
        evaluation = _read_json(stage.evaluation_json) if stage.evaluation_json.exists() else None
        stages.append({**row, "history": state.get("history", []), "evaluation": evaluation})
    return {"dir": str(run_dir), "report": report, "config": config or {}, "stages": stages,
            "fusion": _load_fusion(run, report)}


def _load_fusion(run: RunLayout, report: dict) -> dict | None:
    """The both-eye fusion stage as ``load_run`` gives a stage (report row, ``history``, ``evaluation``), or None."""
    if not report.get("fusion"):
        return None
    files = run.fusion
    state = _read_json(files.state) if files.state.exists() else {}
    evaluation = _read_json(files.evaluation_json) if files.evaluation_json.exists() else None
    return {**report["fusion"], "history": state.get("history", []), "evaluation": evaluation}


def with_fusion(run: dict) -> list[dict]:
    """A loaded run's stages, then its fusion stage when it has one: the rows of the kappa and Table IV tables."""
    return run["stages"] + ([run["fusion"]] if run.get("fusion") else [])


# ----------------------------------------------------------------------------------------- analysis
def cumulative_curve(stages: list[dict]) -> list[dict]:
    """Every epoch of a run in order with its cumulative training seconds (epochs' seconds summed
    over the stages before it too): ``{"stage", "epoch", "elapsed", "val_kappa", "val_loss"}``.

    ``val_kappa`` is the kappa at cut-offs optimised on validation, the measure that picks each stage's
    epoch; histories written before it existed give their kappa at the fixed cut-offs. (The fixed
    cut-offs' kappa swings by 0.2 from epoch to epoch while the ranking improves, so the time to reach a
    level measured on it is mostly noise.)
    """
    points, elapsed = [], 0.0
    for stage in stages:
        for row in stage["history"]:
            elapsed += float(row["seconds"])
            kappa = row.get("val_kappa_optimized", row["val_kappa"])
            points.append({"stage": stage["stage"], "epoch": row["epoch"], "elapsed": elapsed,
                           "val_kappa": kappa, "val_loss": row["val_loss"]})
    return points


def first_time_reaching(curve: list[dict], target: float) -> float | None:
    """The elapsed seconds at the first epoch whose validation kappa reaches ``target``; None if none."""
    for point in curve:
        kappa = point["val_kappa"]
        if kappa is not None and math.isfinite(kappa) and kappa >= target - 1e-12:
            return point["elapsed"]
    return None


def compare_scratch(ladder: dict, scratch: dict) -> dict:
    """Stepwise against from scratch, by validation kappa per epoch and training time."""
    ladder_curve = cumulative_curve(ladder["stages"])
    scratch_curve = cumulative_curve(scratch["stages"])
    scratch_best = max((p["val_kappa"] for p in scratch_curve), default=None)
    ladder_best = max((p["val_kappa"] for p in ladder_curve), default=None)
    top = scratch["stages"][-1]
    ev = top.get("evaluation")
    return {
        "stage": top["stage"],
        "scratch_epochs": top["epochs"],
        "scratch_seconds": scratch_curve[-1]["elapsed"] if scratch_curve else 0.0,
        "ladder_seconds": ladder_curve[-1]["elapsed"] if ladder_curve else 0.0,
        "scratch_best_val_kappa": scratch_best,
        "ladder_best_val_kappa": ladder_best,
        "ladder_top_stage_best_val_kappa": max((p["val_kappa"] for p in ladder_curve
                                                if p["stage"] == ladder["stages"][-1]["stage"]), default=None),
        "scratch_test_kappa": ev["kappa"] if ev else None,
        "ladder_test_kappa": (ladder["stages"][-1].get("evaluation") or {}).get("kappa"),
        "ladder_time_to_scratch_best": first_time_reaching(ladder_curve, scratch_best) if scratch_best is not None else None,
        "scratch_time_to_scratch_best": first_time_reaching(scratch_curve, scratch_best) if scratch_best is not None else None,
        "ladder_curve": ladder_curve,
        "scratch_curve": scratch_curve,
    }


def _ci_overlap(a: dict, b: dict) -> bool | None:
    if None in (a.get("ci_low"), a.get("ci_high"), b.get("ci_low"), b.get("ci_high")):
        return None
    return not (a["ci_high"] < b["ci_low"] or b["ci_high"] < a["ci_low"])


def findings(stages: list[dict], comparison: dict | None, throughput: dict | None) -> list[str]:
    """Plain sentences stating what the numbers show (computed, not tuned to any expectation)."""
    lines = []
    rated = [s for s in stages if s.get("evaluation")]
    if len(rated) >= 2:
        kappas = [s["evaluation"]["kappa"]["value"] for s in rated]
        names = [f"{s['stage']} ({s['size']} px)" for s in rated]
        steps = [b - a for a, b in zip(kappas, kappas[1:])]
        trend = ("does not change" if all(d == 0 for d in steps)
                 else "rises at every step" if all(d > 0 for d in steps)
                 else "falls at every step" if all(d < 0 for d in steps) else "does not change monotonically")
        first, last = rated[0]["evaluation"]["kappa"], rated[-1]["evaluation"]["kappa"]
        overlap = _ci_overlap(first, last)
        lines.append(
            f"Test kappa {trend} with resolution: " + ", ".join(f"{n} {k:.3f}" for n, k in zip(names, kappas))
            + f" (change {kappas[-1] - kappas[0]:+.3f} from the first to the last stage; the 95 % intervals of "
            f"these two {'overlap' if overlap else 'do not overlap' if overlap is False else 'are not available'})."
        )
        if len(steps) >= 2 and all(d > 0 for d in steps):
            shrinking = all(b < a for a, b in zip(steps, steps[1:]))
            lines.append("Each doubling of the input gains " + ", ".join(f"{d:+.3f}" for d in steps)
                         + (": smaller gains per doubling, the paper's roughly logarithmic growth."
                            if shrinking else ": the gains do not shrink per doubling."))
        for key in ("mild_dr", "any_dr"):
            f_first = rated[0]["evaluation"]["table_iv"][key]["f1"]["value"]
            f_last = rated[-1]["evaluation"]["table_iv"][key]["f1"]["value"]
            if f_first is not None and f_last is not None:
                lines.append(f"{ROW_LABELS[key]} F1 {f_first:.3f} -> {f_last:.3f} ({f_last - f_first:+.3f}) from "
                             f"{rated[0]['stage']} to {rated[-1]['stage']}; recall "
                             f"{rated[0]['evaluation']['table_iv'][key]['recall']['value'] or 0:.3f} -> "
                             f"{rated[-1]['evaluation']['table_iv'][key]['recall']['value'] or 0:.3f}.")
        aucs = [(s["stage"], (s["evaluation"].get("mild_dr_auc") or {}).get("value")) for s in rated]
        if all(v is not None for _, v in aucs):
            lines.append("Mild-DR AUC (the score, grade 1 against grade 0): " + ", ".join(
                f"{name} {v:.3f}" for name, v in aucs) + " (0.5: no better than chance).")
        lines.append("Validation kappa at the fixed cut-offs 0.5/1.5/2.5/3.5 (best epoch) against test kappa at the "
                     "cut-offs optimised on validation: " + ", ".join(
                         f"{s['stage']} {s['val_kappa']:.3f} / {s['evaluation']['kappa']['value']:.3f}"
                         for s in rated if s["val_kappa"] is not None) + ".")
    if comparison:
        c = comparison
        reach = c["ladder_time_to_scratch_best"]
        lines.append(
            f"From scratch, the {c['stage']} stage trained {c['scratch_epochs']} epochs in {c['scratch_seconds']:.0f} s "
            f"(the ladder: {c['ladder_seconds']:.0f} s) and reached best validation kappa "
            f"{c['scratch_best_val_kappa']:.3f} after {c['scratch_time_to_scratch_best']:.0f} s; the ladder's best was "
            f"{c['ladder_best_val_kappa']:.3f}, and it "
            + (f"first reached {c['scratch_best_val_kappa']:.3f} after {reach:.0f} s "
               f"({reach / c['scratch_time_to_scratch_best']:.2f} of scratch's time)." if reach is not None
               else "never reached the scratch run's best.")
        )
        ladder_test, scratch_test = c.get("ladder_test_kappa"), c.get("scratch_test_kappa")
        if ladder_test and scratch_test and ladder_test.get("value") is not None and scratch_test.get("value") is not None:
            overlap = _ci_overlap(ladder_test, scratch_test)
            lines.append(f"Test kappa: ladder {ladder_test['value']:.3f} against scratch {scratch_test['value']:.3f} "
                         f"({ladder_test['value'] - scratch_test['value']:+.3f}; intervals "
                         f"{'overlap' if overlap else 'do not overlap' if overlap is False else 'not available'}).")
    if throughput:
        fractions = [s["fraction_of_peak"] for s in throughput["stages"]]
        lines.append(
            f"Training reaches {min(fractions):.1%}-{max(fractions):.1%} of this machine's measured fp32 matmul peak "
            f"({throughput['peak']['flops'] / 1e9:.1f} GFLOP/s); the input pipeline alone is "
            + ", ".join(f"{s['input']['images_per_s'] / s['train']['images_per_s']:.1f}x" for s in throughput["stages"])
            + " the training step's images/s per stage."
        )
    return lines


# ----------------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    plt = _plt()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def _label_and_save(fig, ax, path, *, xlabel: str | None, ylabel: str, title: str, **legend) -> None:
    """Axis labels, title, a light grid and a small legend, then the figure written to ``path``."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, **legend)
    fig.tight_layout()
    _save(fig, path)


def plot_val_loss(stages: list[dict], path) -> None:
    """Fig. 2: validation loss (MSE of the grade) per epoch, one curve per stage."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for s in stages:
        epochs = [r["epoch"] for r in s["history"]]
        ax.plot(epochs, [r["val_loss"] for r in s["history"]], marker="o", ms=3, label=f"{s['stage']} ({s['size']} px)")
    _label_and_save(fig, ax, path, xlabel="epoch of the stage", ylabel="validation loss (MSE of the grade)",
                    title="Validation loss per stage (cf. the paper's Fig. 2)")


def plot_confusion(stage: dict, path) -> None:
    """Fig. 3: the stage's test confusion matrix as a heat map (row-normalised colour, counts written)."""
    import numpy as np

    plt = _plt()
    matrix = np.asarray(stage["evaluation"]["confusion_matrix"], dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=9,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("true grade")
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_yticks(range(matrix.shape[0]))
    ax.set_title(f"Test confusion, {stage['stage']} ({stage['size']} px)")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true grade's row")
    fig.tight_layout()
    _save(fig, path)


def plot_kappa_vs_stage(stages: list[dict], path) -> None:
    """Fig. 5: test kappa per stage with its 95 % interval; marker area proportional to weights."""
    plt = _plt()
    rated = [s for s in stages if s.get("evaluation")]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    x = list(range(len(rated)))
    kappa = [s["evaluation"]["kappa"] for s in rated]
    values = [k["value"] for k in kappa]
    low = [k["value"] - (k["ci_low"] if k["ci_low"] is not None else k["value"]) for k in kappa]
    high = [(k["ci_high"] if k["ci_high"] is not None else k["value"]) - k["value"] for k in kappa]
    biggest = max(s["weights"] for s in rated)
    ax.errorbar(x, values, yerr=[low, high], fmt="none", ecolor="grey", capsize=4, zorder=1)
    ax.scatter(x, values, s=[900 * s["weights"] / biggest for s in rated], alpha=0.6, zorder=2,
               label="this run (area ~ weights)")
    paper = [(i, PAPER_TABLE_III[s["stage"]]) for i, s in enumerate(rated) if s["stage"] in PAPER_TABLE_III]
    if paper:
        ax.plot(*zip(*paper), "k_", ms=18, mew=2, label="paper's Table III (EyePACS)")
    for i, s in enumerate(rated):
        ax.annotate(f"{s['weights'] / 1e6:.2f}M", (i, values[i]), textcoords="offset points", xytext=(12, -4), fontsize=7)
    ax.set_xticks(x, [f"{s['stage']}\n{s['size']} px" for s in rated])
    ax.set_xlim(-0.5, len(rated) - 0.5)
    _label_and_save(fig, ax, path, xlabel=None, ylabel="test quadratic weighted kappa",
                    title="Kappa against stage (cf. the paper's Fig. 5)", loc="best", markerscale=0.5)


def plot_mild_dr_vs_resolution(rows: list[dict], path) -> None:
    """Mild DR against input size (issue 14): the score's grade-1-vs-0 AUC per stage and, where the stages were
    explained, the share of microaneurysms in the hottest 5 % of the heat map; 95 % intervals, chance dashed.
    ``rows``: report.json's stage rows (``mild_dr_auc``, ``ma_hit_rate``, ``size``)."""
    plt = _plt()
    hits = [r for r in rows if r.get("ma_hit_rate")]
    fig, axes = plt.subplots(1, 2 if hits else 1, figsize=(10.0 if hits else 5.4, 4.0), squeeze=False)

    def panel(ax, rated, key, chance, ylabel, title):
        sizes = [r["size"] for r in rated]
        values = [r[key]["value"] for r in rated]
        low = [v - (r[key].get("ci_low") if r[key].get("ci_low") is not None else v) for v, r in zip(values, rated)]
        high = [(r[key].get("ci_high") if r[key].get("ci_high") is not None else v) - v for v, r in zip(values, rated)]
        ax.errorbar(sizes, values, yerr=[low, high], marker="o", capsize=4, label="this run (95 % CI)")
        ax.axhline(chance, color="grey", ls="--", lw=0.8, label=f"chance ({chance:g})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{r['stage']}\n{r['size']} px" for r in rated])
        ax.minorticks_off()
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")

    rated = [r for r in rows if (r.get("mild_dr_auc") or {}).get("value") is not None]
    panel(axes[0][0], rated, "mild_dr_auc", 0.5, "AUC, grade 1 against grade 0 (test)", "Mild DR: AUC of the score")
    if hits:
        panel(axes[0][1], hits, "ma_hit_rate", hits[0]["ma_hit_rate"].get("chance", 0.05),
              "microaneurysms in the hottest 5 %", "Where the net looks: microaneurysm hit rate")
    fig.tight_layout()
    _save(fig, path)


def plot_scratch(comparison: dict, path) -> None:
    """Validation kappa against cumulative training seconds, the ladder and the scratch run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ladder = comparison["ladder_curve"]
    stages = []
    for p in ladder:
        if not stages or stages[-1][0] != p["stage"]:
            stages.append((p["stage"], []))
        stages[-1][1].append(p)
    for name, points in stages:
        ax.plot([p["elapsed"] for p in points], [p["val_kappa"] for p in points], marker="o", ms=3,
                label=f"stepwise: {name}")
    scratch = comparison["scratch_curve"]
    ax.plot([p["elapsed"] for p in scratch], [p["val_kappa"] for p in scratch], "k--", marker="s", ms=3,
            label=f"from scratch: {comparison['stage']}")
    if comparison["scratch_best_val_kappa"] is not None:
        ax.axhline(comparison["scratch_best_val_kappa"], color="grey", lw=0.8, ls=":")
    _label_and_save(fig, ax, path, xlabel="training time, s (epochs incl. validation)",
                    ylabel="validation kappa (cut-offs optimised on validation)",
                    title="Stepwise against from scratch, same time budget")


def _with_points(stages: list[dict]) -> list[dict]:
    """The stages whose test evaluation has operating points and a test ROC curve."""
    return [s for s in stages if ((s.get("evaluation") or {}).get("operating_points") or {}).get("test_roc")]


def plot_roc(stages: list[dict], path) -> None:
    """The test ROC curve for referable DR of every stage, the last stage's operating points at their test
    sensitivity and specificity (95 % intervals as bars), and Gulshan et al.'s two EyePACS-1 points."""
    from retina_scale.grading.operating_points import GULSHAN_EYEPACS1

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    rated = _with_points(stages)
    for s in rated:
        roc = s["evaluation"]["operating_points"]["test_roc"]
        auc = ((s["evaluation"].get("referable") or {}).get("auc") or {}).get("value")
        ax.plot(roc["fpr"], roc["tpr"], lw=1.2, label=f"{s['stage']} ({s['size']} px)"
                + (f", AUC {auc:.3f}" if auc is not None else ""))
    last = rated[-1]
    for (name, point), marker in zip(last["evaluation"]["operating_points"]["points"].items(), "os^"):
        if not point["met"]:
            continue
        sens, spec = point["test_sensitivity"], point["test_specificity"]
        x, y = 1 - spec["value"], sens["value"]
        xerr = [[x - (1 - spec["ci_high"])], [(1 - spec["ci_low"]) - x]] if spec["ci_low"] is not None else None
        yerr = [[y - sens["ci_low"]], [sens["ci_high"] - y]] if sens["ci_low"] is not None else None
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt=marker, ms=7, capsize=3,
                    label=f"{last['stage']}: {name.replace('_', ' ')} (test)")
    for (name, g), marker in zip(GULSHAN_EYEPACS1.items(), "*P"):
        ax.plot([1 - g["specificity"]], [g["sensitivity"]], marker, color="black", ms=10,
                label=f"Gulshan 2016 EyePACS-1: {name.replace('_', ' ')}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    _label_and_save(fig, ax, path, xlabel="1 - specificity (test)", ylabel="sensitivity (test)",
                    title="Referable DR (grade >= 2): ROC and operating points", loc="lower right")


# ----------------------------------------------------------------------------------------- the report
def _cell(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("value") is None:
        return "n/a"
    text = f"{stat['value']:.{digits}f}"
    if stat.get("ci_low") is not None:
        text += f" [{stat['ci_low']:.{digits}f}, {stat['ci_high']:.{digits}f}]"
    return text


def _strip_curves(comparison: dict | None) -> dict | None:
    if comparison is None:
        return None
    return {k: v for k, v in comparison.items() if not k.endswith("_curve")}


def write_report(run_dir, out=None, *, scratch_dir=None, throughput_file=None, study: dict | None = None,
                 complexity: bool = True, hit_rates: dict | None = None) -> dict:
    """Writes REPORT.md, report.json and figures/ for the run in ``run_dir`` into ``out``.

    Args:
        run_dir: a finished stepwise run folder.
        out: where to write (default ``<run_dir>/report``; the run's own report.md stays beside it).
        scratch_dir: a finished from-scratch run of the top stage (the study's control), or None.
        throughput_file: a ``throughput.json`` written by :mod:`retina_scale.evidence.throughput`, or None.
        study: the study's step timings (``study.json``), shown in the report.
        complexity: count weights / multiply-adds / activations (builds each stage once with Keras).
        hit_rates: ``{stage name: lesion hit rates}`` (``retina_scale.evidence.explain.study_hit_rates``), or
            None: each stage's ``ma_hit_rate`` (microaneurysms) and ``lesion_hit_rates`` (every group).

    Returns:
        The summary written to ``report.json``, plus ``report_md`` (the REPORT.md path).
    """
    run = load_run(run_dir)
    files = ReportLayout(out if out is not None else RunLayout(run_dir).report_dir)
    files.figures.mkdir(parents=True, exist_ok=True)
    stages = run["stages"]
    width = float((run["config"].get("model") or {}).get("width", 1.0))
    scratch = load_run(scratch_dir) if scratch_dir is not None else None
    comparison = compare_scratch(run, scratch) if scratch is not None else None
    throughput = _read_json(throughput_file) if throughput_file is not None and Path(throughput_file).exists() else None
    records = None
    if complexity:
        from retina_scale.models.complexity import family_complexity

        records = family_complexity([s["stage"] for s in stages], width=width)
    summary = {
        "run_dir": str(run_dir),
        "width": width,
        "data": data_summary(run),
        "stages": [_stage_summary(s, (hit_rates or {}).get(s["stage"])) for s in stages],
        "fusion": _stage_summary(run["fusion"]) if run.get("fusion") else None,
        "complexity": records,
        "scratch": _strip_curves(comparison),
        "throughput": throughput,
        "study": study,
        "findings": findings(stages, comparison, throughput),
    }
    summary["figures"] = draw_figures(stages, comparison, records, files, summary["stages"])
    text = format_markdown(run, summary, comparison, throughput, records, study)
    write_json(files.summary, summary)
    _write_text(files.markdown, text)
    summary["report_md"] = str(files.markdown)
    return summary


def data_summary(run: dict) -> dict:
    """What the run's photos were (``load_run``'s dict): ``data`` (the config's folder; None: the run's own
    synthetic set), ``normalize`` (``none`` or ``graham``), ``prior`` (the class prior a synthetic set was drawn
    from, read from its ``summary.json``: ``{"name": "eyepacs" | "balanced" | None, "fractions": [5 numbers]}``;
    None for photos the generator did not make) and ``grades`` (per split, the number of photos of each grade
    0-4, from the run's ``splits.csv``; None without one). Issue 14: a study of mild DR may enrich its share, so
    the report says which prior it used."""
    cfg = run["config"].get("data") or {}
    layout = RunLayout(run["dir"])
    summary_file = (Path(cfg["data"]) if cfg.get("data") else layout.synthetic) / "summary.json"
    prior = None
    if summary_file.is_file():
        made = _read_json(summary_file)
        if isinstance(made, dict) and "levels" in made and len(made.get("prior") or ()) == 5:
            prior = {"name": _prior_name(made["prior"]), "fractions": [float(p) for p in made["prior"]]}
    return {"data": cfg.get("data"), "normalize": cfg.get("normalize", "none"), "prior": prior,
            "grades": _split_grades(layout.splits) if layout.splits.is_file() else None}


def _prior_name(fractions) -> str | None:
    """The generator's name for these five fractions (``data.synthetic.plan.PRIORS``), or None."""
    from retina_scale.data.synthetic.plan import PRIORS

    for name, values in PRIORS.items():
        total = sum(values)
        if all(abs(float(f) - v / total) <= 1e-6 for f, v in zip(fractions, values)):
            return name
    return None


def _split_grades(splits_csv) -> dict[str, list[int]]:
    """``{split: [photos of grade 0, ..., 4]}`` of a run's ``splits.csv`` (unlabelled rows left out)."""
    import csv

    counts: dict[str, list[int]] = {}
    with open(splits_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            label = (row.get("label") or "").strip()
            if label.isdigit() and int(label) < 5:
                counts.setdefault(row["split"], [0] * 5)[int(label)] += 1
    return {split: counts[split] for split in ("train", "val", "test") if split in counts}


def _data_line(data: dict) -> str:
    """REPORT.md's line on the photos: where from, the class prior, the normalisation, grades per split."""
    prior = data["prior"]
    where = f"`{data['data']}`" if data["data"] else "the run's own synthetic set"
    drawn = ("" if prior is None else f", drawn with the {prior['name'] or 'custom'} class prior "
             f"({', '.join(f'{f:.3f}' for f in prior['fractions'])} for grades 0-4)")
    grades = "; ".join(f"{split} {'/'.join(map(str, n))}" for split, n in (data["grades"] or {}).items())
    return (f"Photos: {where}{drawn}; colour normalisation {data['normalize']}"
            + (f"; photos per grade 0/1/2/3/4: {grades}" if grades else "") + ".")


def _stage_summary(s: dict, hit_rates: dict | None = None) -> dict:
    evaluation = s.get("evaluation") or {}
    return {
        "stage": s["stage"], "size": s["size"], "epochs": s["epochs"], "weights": s["weights"],
        "seconds": s["seconds"], "val_kappa": s["val_kappa"],
        "test_kappa": evaluation.get("kappa"),
        "table_iv": evaluation.get("table_iv"),
        "referable": evaluation.get("referable"),
        "mild_dr_auc": evaluation.get("mild_dr_auc"),
        "operating_points": {k: v for k, v in (evaluation.get("operating_points") or {}).items() if k != "test_roc"}
        or None,
        "tta_draws": evaluation.get("tta_draws", 1),
        "ma_hit_rate": (hit_rates or {}).get("microaneurysm"),
        "lesion_hit_rates": hit_rates,
        "test_images": s.get("test_images"),
        "val_loss": [r["val_loss"] for r in s["history"]],
        "val_kappa_per_epoch": [r["val_kappa"] for r in s["history"]],
    }


def draw_figures(stages: list[dict], comparison: dict | None, records: list[dict] | None,
                 files: ReportLayout, rows: list[dict] | None = None) -> dict[str, str]:
    """Draws every figure the data allows into ``files.figures``; returns ``{name: path relative to
    the report}`` of those drawn. ``rows``: the report's stage rows (``_stage_summary``), for the mild-DR figure."""
    made = {}

    def draw(name, plot, data):
        path = files.figures / f"{name}.png"
        plot(data, path)
        made[name] = path.relative_to(files.root).as_posix()

    if any(s["history"] for s in stages):
        draw("val_loss", plot_val_loss, stages)
    if stages[-1].get("evaluation"):
        draw("confusion", plot_confusion, stages[-1])
    if records is not None:
        from retina_scale.models.complexity import plot_complexity

        draw("complexity", plot_complexity, records)
    if any(s.get("evaluation") for s in stages):
        draw("kappa_vs_stage", plot_kappa_vs_stage, stages)
    if comparison is not None:
        draw("stepwise_vs_scratch", plot_scratch, comparison)
    if _with_points(stages):
        draw("roc", plot_roc, stages)
    if rows and any((r.get("mild_dr_auc") or {}).get("value") is not None for r in rows):
        draw("mild_dr_vs_resolution", plot_mild_dr_vs_resolution, rows)
    if files.stage_panel.is_file():  # drawn by a study's explain step (evidence.explain.draw_stage_panel)
        made["grade1_by_stage"] = files.stage_panel.relative_to(files.root).as_posix()
    return made


# ------------------------------------------------------------------------------------------ REPORT.md
def format_markdown(run, summary, comparison, throughput, records, study) -> str:
    """REPORT.md: a header, the findings, then one section per table or figure of the paper."""
    stages, figs = run["stages"], summary["figures"]
    lines = _header_section(run, summary, throughput, study)
    summaries = summary["stages"] + ([summary["fusion"]] if summary["fusion"] else [])
    lines += _kappa_section(with_fusion(run), figs, summaries) + _fusion_lines(run.get("fusion"))
    lines += _table_iv_section(with_fusion(run))
    lines += _figure_section("## 3. Validation loss per epoch (Fig. 2)", figs, "val_loss", "validation loss")
    lines += _confusion_section(stages, figs)
    lines += _complexity_section(records, figs, summary["width"])
    lines += ["## 6. Kappa against stage (Fig. 5)", "", "See section 1's figure: marker area is proportional to the "
              "stage's weights, bars are the 95 % intervals, black ticks the paper's Table III.", ""]
    lines += _scratch_section(comparison, figs)
    lines += _throughput_section(throughput)
    lines += _operating_points_section(stages, figs)
    return "\n".join(lines)


def _header_section(run, summary, throughput, study) -> list[str]:
    cfg = run["config"]
    machine = (throughput or {}).get("machine") or {"platform": platform.platform(), "cpus": None}
    lines = [f"# Resolution report: `{run['report']['name']}`", ""]
    lines += [f"Run folder `{run['dir']}`; width multiplier {summary['width']:g}; "
              f"global batch {cfg.get('global_batch_size', '?')}; optimiser {(cfg.get('optim') or {}).get('name', '?')}; "
              f"strategy {run['report'].get('strategy')} x{run['report'].get('replicas')}.",
              f"Machine: {machine.get('platform')}, {machine.get('cpus')} CPUs"
              + (f", TensorFlow {machine['tensorflow']}, Keras {machine['keras']}" if "tensorflow" in machine else "") + ".",
              _data_line(summary["data"])]
    if study:
        lines.append("Wall time per step: " + ", ".join(f"{k.replace('_seconds', '')} {v:.0f} s" for k, v in study.items()) + ".")
    lines.append("")
    if summary["findings"]:
        lines += ["## What the numbers show", ""] + [f"- {f}" for f in summary["findings"]] + [""]
    return lines


def _figure_section(title: str, figs: dict, name: str, alt: str) -> list[str]:
    lines = [title, ""]
    if name in figs:
        lines += [f"![{alt}]({figs[name]})", ""]
    return lines


def _kappa_section(stages, figs, summaries) -> list[str]:
    lines = ["## 1. Kappa per stage (Table III)", "",
             "Test split, thresholds optimised on validation; 95 % percentile bootstrap intervals over patients. "
             "Mild-DR AUC: the score's AUC for grade 1 against grade 0 (images of those grades only).", ""]
    hits = any(x.get("ma_hit_rate") for x in summaries)
    rows = []
    for s, x in zip(stages, summaries):
        ev = s.get("evaluation") or {}
        rows.append((s["stage"], s["size"], s["epochs"], f"{s['weights'] / 1e6:.3f} M",
                     f"{s['val_kappa']:.3f}" if s["val_kappa"] is not None else "n/a",
                     _cell(ev.get("kappa")), _cell(ev.get("mild_dr_auc")),
                     *((_cell(x.get("ma_hit_rate")),) if hits else ()), ev.get("n_images", 0),
                     f"{PAPER_TABLE_III[s['stage']]:.3f}" if s["stage"] in PAPER_TABLE_III else "-"))
    lines += markdown_table(("stage", "px", "epochs", "weights", "best val kappa", "test kappa [95 % CI]",
                             "mild-DR AUC [95 % CI]", *(("MA hit rate [95 % CI]",) if hits else ()), "test images",
                             "paper (EyePACS)"), rows) + [""]
    if hits:
        lines += _hit_rate_lines(summaries)
    if "mild_dr_vs_resolution" in figs:
        lines += [f"![mild-DR AUC and microaneurysm hit rate against resolution]({figs['mild_dr_vs_resolution']})", ""]
    if "grade1_by_stage" in figs:
        lines += ["One grade-1 test photo (chosen by rule before any heat map was drawn: the first by name with at "
                  "least three microaneurysms) at every stage: Grad-CAM of the grade, hottest 5 % outlined, "
                  "microaneurysms circled in cyan.", "", f"![one grade-1 photo at every stage]({figs['grade1_by_stage']})",
                  ""]
    if "kappa_vs_stage" in figs:
        lines += [f"![kappa against stage]({figs['kappa_vs_stage']})", ""]
    return lines


def _fusion_lines(fusion: dict | None) -> list[str]:
    """What the ``fusion`` row is, and how many test photos had no usable fellow eye (graded by the top stage)."""
    if not fusion:
        return []
    fallback = ((fusion.get("evaluation") or {}).get("fallback")) or {}
    alone = ", ".join(f"{n} {reason}" for reason, n in fallback.items()) or "none"
    return [f"Row `fusion`: both eyes of a patient graded together from the top stage's features "
            f"(`fusion.enabled`); test photos without a usable fellow eye, graded by the top stage alone: {alone}.", ""]


def _hit_rate_lines(summaries) -> list[str]:
    """The lesion hit rates of every stage and group (``retina-scale explain``), against chance."""
    rows = [(x["stage"], group, _cell(r), r["n_lesions"], r["n_photos"], f"{r['chance']:.2f}")
            for x in summaries for group, r in (x.get("lesion_hit_rates") or {}).items()]
    return (["Lesion hit rate (Grad-CAM of each stage on the test photos with lesions; `retina-scale explain`): the "
             "share of lesions inside the hottest part of the fundus area of their photo's heat map; "
             "microaneurysms on grade-1 photos, haemorrhages and hard exudates on any photo that has them.", ""]
            + markdown_table(("stage", "lesions", "hit rate [95 % CI]", "lesions counted", "photos", "chance"), rows)
            + [""])


def _table_iv_section(stages) -> list[str]:
    header = ("stage", "class", "precision", "recall", "F1")
    rated = [s for s in stages if s.get("evaluation")]
    rows = [(s["stage"], label, *(_cell(s["evaluation"]["table_iv"][key][m]) for m in ("precision", "recall", "f1")))
            for s in rated for key, label in ROW_LABELS.items()]
    paper_rows = [("large (paper)", ROW_LABELS[k], *(f"{v:.3f}" for v in vals)) for k, vals in PAPER_TABLE_IV.items()]
    referable = [(s["stage"], *(_cell(s["evaluation"]["referable"][m]) for m in ("sensitivity", "specificity", "auc")))
                 for s in rated]
    return (["## 2. No DR / any DR / mild DR, referable DR (Table IV)", ""]
            + markdown_table(header, rows) + [""]
            + ["The paper's large model on EyePACS, for reference:", ""]
            + markdown_table(header, paper_rows) + [""]
            + ["Referable DR (grade >= 2):", ""]
            + markdown_table(("stage", "sensitivity", "specificity", "AUC"), referable) + [""])


def _confusion_section(stages, figs) -> list[str]:
    lines = ["## 4. Confusion matrix of the last stage (Fig. 3)", ""]
    if "confusion" in figs:
        matrix = stages[-1]["evaluation"]["confusion_matrix"]
        lines += [f"![confusion]({figs['confusion']})", ""]
        lines += markdown_table(("true \\ predicted", *map(str, range(len(matrix)))),
                                [(str(i), *row) for i, row in enumerate(matrix)]) + [""]
    return lines


def _complexity_section(records, figs, width: float) -> list[str]:
    lines = ["## 5. Complexity per stage (Fig. 4)", ""]
    if records:
        lines += [f"![complexity]({figs['complexity']})", ""]
        lines += markdown_table(("stage", "px", "weights", "multiply-adds / image", "activations / image"),
                                [(r["stage"], r["input_size"], f"{r['weights'] / 1e6:.3f} M", f"{r['macs'] / 1e6:.1f} M",
                                  f"{r['activations'] / 1e6:.3f} M") for r in records]) + [""]
        if width != 1.0:
            lines += [f"(Width {width:g}: the paper's full-width counts are in `retina-scale complexity`.)", ""]
    return lines


def _scratch_section(comparison, figs) -> list[str]:
    lines = ["## 7. Stepwise against from scratch", ""]
    if not comparison:
        return lines + ["Not run: `retina-scale study` (or `python scripts/resolution_study.py`) trains the top stage "
                        "from scratch for the ladder's time and reports it here.", ""]
    c = comparison
    fmt = lambda v: "never" if v is None else f"{v:.0f} s"  # noqa: E731
    lines += markdown_table(
        ("run", "training time", "best val kappa", "test kappa [95 % CI]", "time to reach scratch's best val kappa"),
        [("stepwise ladder", f"{c['ladder_seconds']:.0f} s", f"{c['ladder_best_val_kappa']:.3f}",
          _cell(c["ladder_test_kappa"]), fmt(c["ladder_time_to_scratch_best"])),
         (f"{c['stage']} from scratch ({c['scratch_epochs']} epochs)", f"{c['scratch_seconds']:.0f} s",
          f"{c['scratch_best_val_kappa']:.3f}", _cell(c["scratch_test_kappa"]), fmt(c["scratch_time_to_scratch_best"]))])
    return lines + ["", f"![stepwise against scratch]({figs['stepwise_vs_scratch']})", "",
                    "Training time is the sum of the epochs' seconds (training and validation); transfers, test "
                    "evaluation and exports are not counted in either run.", ""]


def _throughput_section(throughput) -> list[str]:
    lines = ["## 8. Throughput per stage", ""]
    if not throughput:
        return lines + ["Not measured: `retina-scale study` (or `retina-scale report --measure`) measures it.", ""]
    peak = throughput["peak"]
    rows = [(s["stage"], s["size"], f"{s['train']['images_per_s']:.1f}", f"{s['train']['forward_macs'] / 1e6:.1f} M",
             f"{s['achieved_flops'] / 1e9:.2f}", f"{s['fraction_of_peak']:.1%}", f"{s['input']['images_per_s']:.0f}",
             f"{s['predict']['images_per_s']:.1f}" if s.get("predict") else "-",
             f"{s['epoch_images_per_s']:.1f}" if s.get("epoch_images_per_s") else "-")
            for s in throughput["stages"]]
    lines += markdown_table(("stage", "px", "train img/s", "fwd mult-adds", "achieved GFLOP/s", "of fp32 peak",
                             "input img/s", "export predict img/s", "run's epochs img/s"), rows)
    return lines + ["", f"fp32 matmul peak measured in the same process: {peak['flops'] / 1e9:.1f} GFLOP/s "
                    f"({peak['n']}x{peak['n']} matmul, best of 5). Achieved = 3 x forward multiply-adds x 2 x train img/s; "
                    "train img/s is the training step alone on in-memory images (global batch "
                    f"{throughput['stages'][0]['train']['batch']}); input img/s is the cached, augmented, resampled "
                    "training input alone; predict is the exported SavedModel's serving_default; the run's epochs include "
                    "input, training and validation.", ""]


def _operating_points_section(stages, figs) -> list[str]:
    """Section 9: each stage's referable-DR operating points, on validation and on test, beside Gulshan's."""
    from retina_scale.grading.operating_points import GULSHAN_EYEPACS1, ROW_HEADER, operating_point_rows

    lines = ["## 9. Operating points for referable DR", ""]
    rated = [s for s in stages if (s.get("evaluation") or {}).get("operating_points")]
    if not rated:
        return lines + ["Not available: the stages' evaluations predate operating points (retrain to get them).", ""]
    rows = [(s["stage"], *row) for s in rated for row in operating_point_rows(s["evaluation"]["operating_points"])]
    gulshan = [(name.replace("_", " "), f"{g['sensitivity']:.1%}", f"{g['specificity']:.1%}")
               for name, g in GULSHAN_EYEPACS1.items()]
    lines += ["Thresholds on the continuous score chosen on validation (refer when score >= threshold): high "
              "specificity = the highest sensitivity with specificity >= 98 %, high sensitivity = the highest "
              "specificity with sensitivity >= 97.5 %, Youden = the highest sensitivity + specificity - 1. Test "
              "rates with 95 % percentile bootstrap intervals over patients; a point the validation split could "
              "not give says why.", ""]
    lines += markdown_table(("stage", *ROW_HEADER), rows) + [""]
    lines += ["Gulshan et al. (JAMA 2016), EyePACS-1, for reference:", ""]
    lines += markdown_table(("operating point", "sensitivity", "specificity"), gulshan) + [""]
    if "roc" in figs:
        lines += [f"![ROC and operating points]({figs['roc']})", ""]
    return lines


def format_closing(summary: dict, export_path: str | None = None, searched: bool = False) -> str:
    """The main job's last words: per stage test kappa with its interval, mild-DR F1, referable sensitivity
    and specificity and seconds, then where the report is, what to do next with the export, and how the
    learning rates were set (the search, ``--tune``, stays a visible part of the main job).

    Args:
        summary: what :func:`write_report` returned (``report_md`` included).
        export_path: the last stage's SavedModel version folder, if it was exported.
        searched: whether Keras Tuner chose the stages' learning rates in this run.
    """
    rows = []
    for s in summary["stages"] + ([summary["fusion"]] if summary.get("fusion") else []):
        mild = ((s.get("table_iv") or {}).get("mild_dr") or {}).get("f1")
        referable = s.get("referable") or {}
        rows.append((s["stage"], str(s["size"]), _cell(s.get("test_kappa")), _cell(mild, 2),
                     _cell(referable.get("sensitivity"), 2), _cell(referable.get("specificity"), 2),
                     f"{s['seconds']:.0f}"))
    table = text_table(("stage", "px", "test kappa [95 % CI]", "mild-DR F1", "referable sensitivity",
                        "referable specificity", "seconds"), rows, right=(1, 6))
    report = Path(summary["report_md"])
    model = str(Path(export_path).parent) if export_path else "saved_models/<model>"
    return "\n".join([
        table,
        f"Report: {report} (tables and figures: {report.parent / 'figures'})",
        f"Evaluate the export on new photos: retina-scale evaluate --model {model} --data PHOTOS --format folders",
        f"Serve it: TF Serving on {Path(model).parent} (README, 'Run TF Serving'), or grade a folder without a "
        f"server: retina-scale predict --model {model} --images PHOTOS --out predictions.csv",
        ("Learning rates: searched per stage by Keras Tuner (trial tables in the report); --no-tune uses the "
         "config's" if searched else
         "Learning rates: the config's; add --tune to search each stage's with Keras Tuner first (README, "
         "'Learning-rate search')"),
    ])
