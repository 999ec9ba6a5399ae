"""``report.md`` of a pipeline run: training curves, gate statistics per layer, score histograms,
selection composition, and the eval table of the selection next to its baselines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from selectmoe.layout import (
    COMPOSITION,
    GATE_LAYERS,
    METRICS,
    REPORT,
    RESULTS,
    SCORE_HISTOGRAMS,
    STAGE_DIRS,
    TRAINING_CURVES,
)
from selectmoe.manifest import read_manifest
from selectmoe.reporting.compare import compare_runs
from selectmoe.reporting.plots import plot_gate_layers, plot_selection_composition


def write_report(
    run: Path, branches: dict[str, Path], seconds: float, extra_sections: list[str] | None = None
) -> Path:
    lines = [
        f"# Select-MoE run: {run.name}",
        "",
        f"Run folder `{run}`; this invocation took {seconds:.0f} s.",
        "",
    ]
    stage1, stage2 = run / STAGE_DIRS["pretrain"], run / STAGE_DIRS["select"]

    # ---- stage 1
    m1 = read_manifest(stage1) or {}
    history = _metrics(stage1 / METRICS)
    lines += ["## Stage 1: router pretraining", ""]
    if history:
        last = history[-1]
        c = m1.get("counts", {})
        lines += [
            f"{c.get('rows_trained')} rows, {c.get('steps')} steps, effective batch {c.get('effective_batch')}, "
            f"{c.get('workers')} worker(s). Final LM loss {last['lm_loss']:.4f}, quality loss "
            f"{last['quality_loss']:.4f}.",
            "",
            _image(run, stage1 / TRAINING_CURVES, "stage 1 training curves"),
            "",
            *(
                [
                    f"Gate direction, checked on {m1['metrics'].get('gate_direction_from', 'labelled probe rows')}"
                    f" that stage 1 did not train on: AUROC {(m1['metrics']['gate_quality_correlation'] + 1) / 2:.3f}"
                    f" (correlation {m1['metrics']['gate_quality_correlation']:+.3f}); "
                    f"{m1['metrics']['gate_direction']}.",
                    "",
                ]
                if "gate_direction" in m1.get("metrics", {})
                else []
            ),
            "Gate statistics per layer at the last step (g = sigmoid(quality score), over all tokens):",
            "",
            "| layer | mean g | std g |",
            "|---:|---:|---:|",
            *[
                f"| {i} | {m:.4f} | {s:.4f} |"
                for i, (m, s) in enumerate(zip(last["gate_mean"], last["gate_std"]))
            ],
            "",
            _image(run, plot_gate_layers(history, run / GATE_LAYERS), "gate mean per layer"),
            "",
        ]

    # ---- stage 2
    m2 = read_manifest(stage2) or {}
    if m2:
        c = m2["counts"]
        lines += [
            "## Stage 2: scoring and selection",
            "",
            f"Rows read {c['rows_read']} = scored {c['rows_scored']} + rejected {c['rows_rejected']}; "
            f"excluded as stage-1 training rows {c.get('rows_excluded_training', 0)}; selected {c['rows_selected']} "
            f"({m2['config']['selection']['method']}), score cut {m2['metrics'].get('score_threshold')}.",
            "",
            f"Score of a row: `{m2['metrics'].get('score_formula', 'mean gate')}` (`selectmoe.select.score`).",
            "",
        ]
        how = next((v for v in m2["metrics"].values() if isinstance(v, dict) and "chosen_by" in v), None)
        if how:
            keep = f" (selection.keep_fraction {how['keep_fraction']})" if "keep_fraction" in how else ""
            lines += [f"How the rows were chosen: {how['chosen_by']}{keep}.", ""]
            if "caution" in how:
                lines += [f"**Caution:** {how['caution']}.", ""]
            if (frequent := how.get("frequent_replies_by_dataset")) is not None:
                counts = ", ".join(f"{name} {n}" for name, n in frequent.items()) or "none"
                lines += [
                    f"Frequent replies, each a stratum of its own (`selection.strata=reply`): {counts}.",
                    "",
                ]
        if cal := m2["metrics"].get("calibrated"):
            weights = ", ".join(f"{name} {value:+.3f}" for name, value in cal["coefficients"].items())
            lines += [
                f"Calibrated combiner (`{cal['combiner']}`): {cal['trusted_rows']} trusted rows against "
                f"{cal['corpus_rows']} corpus rows, cross-validated AUROC {cal['cv_auroc']:.3f}; standardised "
                f"coefficients: {weights}. Gate direction: {cal['gate_direction']}.",
                "",
            ]
        if signed := m2["metrics"].get("gate_sign"):
            lines += [
                f"Gate term's sign from `selection.trusted`: the mean gate tells {signed['trusted_rows']} "
                f"trusted rows from {signed['corpus_rows']} corpus rows with AUROC "
                f"{signed['mean_gate_auroc']:.3f} (trusted positive), so the gate weight "
                f"{signed['configured_gate_weight']:g} is used as {signed['gate_weight']:g}: "
                f"{signed['direction']}.",
                "",
            ]
        lines += [
            _image(run, stage2 / SCORE_HISTOGRAMS, "score histograms per dataset"),
            "",
        ]
        corpus = {name: d["rows_accepted"] for name, d in c.get("datasets", {}).items()}
        composition = {"corpus": corpus, "selected": c.get("selected_by_dataset", {})}
        for name, root in branches.items():
            if name != "selected" and (m := read_manifest(root / STAGE_DIRS["select"])):
                composition[name] = m["counts"].get("selected_by_dataset", {})
        lines += [
            "Selection composition (share of rows per source dataset):",
            "",
            composition_table(corpus, composition["selected"]),
            "",
            _image(run, plot_selection_composition(composition, run / COMPOSITION), "composition"),
            "",
        ]

    # ---- stage 3
    lines += ["## Stage 3: finetuning", ""]
    for name, root in branches.items():
        m3 = read_manifest(root / STAGE_DIRS["finetune"])
        if m3:
            c = m3.get("counts", {})
            lines += [
                f"- **{name}**: {c.get('rows_trained')} rows, {c.get('steps')} steps, final loss "
                f"{m3.get('metrics', {}).get('final_loss', float('nan')):.4f} (first "
                f"{m3.get('metrics', {}).get('first_loss', float('nan')):.4f})",
            ]
    lines.append("")
    for name, root in branches.items():
        curves = root / STAGE_DIRS["finetune"] / TRAINING_CURVES
        if curves.exists():
            lines += [_image(run, curves, f"stage 3 curves ({name})", prefix=name), ""]

    # ---- stage 4
    evals = {
        name: str(root / STAGE_DIRS["evaluate"])
        for name, root in branches.items()
        if (root / STAGE_DIRS["evaluate"] / RESULTS).exists()
    }
    if evals:
        table = compare_runs(list(evals.values()), labels=list(evals))
        lines += ["## Stage 4: evaluation", "", table, ""]
    for section in extra_sections or []:
        lines += [section, ""]
    path = run / REPORT
    path.write_text("\n".join(lines))
    return path


OVER_REPRESENTED = 2.0  # a dataset with more than this times its corpus share in the selection is flagged


def composition_table(corpus: dict[str, int], selected: dict[str, int]) -> str:
    """Markdown: rows and share per source dataset in the corpus and in the selection, plus one
    sentence per dataset whose selection share is more than ``OVER_REPRESENTED`` x its corpus share."""
    n_corpus, n_selected = sum(corpus.values()), sum(selected.values())
    lines = [
        "| dataset | corpus rows | corpus share | selected rows | selected share |",
        "|---|---:|---:|---:|---:|",
    ]
    flagged = []
    for name in sorted(set(corpus) | set(selected)):
        share_corpus = corpus.get(name, 0) / n_corpus if n_corpus else 0.0
        share_selected = selected.get(name, 0) / n_selected if n_selected else 0.0
        lines.append(
            f"| {name} | {corpus.get(name, 0)} | {share_corpus:.1%} | {selected.get(name, 0)} | {share_selected:.1%} |"
        )
        if share_selected > OVER_REPRESENTED * share_corpus:
            flagged.append(
                f"**{name} is over-represented**: {share_selected:.0%} of the selection against "
                f"{share_corpus:.0%} of the corpus; the score may rank datasets rather than rows "
                "(`select.selection.balance=dataset` keeps the corpus mix)."
            )
    return "\n".join([*lines, "", *flagged]).rstrip() + "\n"


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _image(run: Path, image: Path, alt: str, prefix: str = "") -> str:
    """Markdown for a PNG, copied next to report.md so the report folder is self-contained."""
    if not image.exists():
        return f"_({alt}: not produced)_"
    name = (
        f"{prefix + '_' if prefix else ''}{image.parent.name}_{image.name}"
        if image.parent != run
        else image.name
    )
    if image.parent != run:
        shutil.copy(image, run / name)
    return f"![{alt}]({name})"


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for row in rows:
        cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.3f}" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
