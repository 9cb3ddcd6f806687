"""A report per evaluated run: Markdown with PNG figures (matplotlib, Agg backend).

run/report/report.md          (run/report_search/ for AnoGAN's latent-search scoring)
losses.png                    training losses and the validation loss against the step
scores.png                    score histograms: held-out normals, test normals, test anomalies, threshold
roc_pr.png                    ROC and precision-recall curves of the test set
lambda_sweep.png              AUROC, AUPRC and F1 against lambda (seed 000's figure)
examples.png                  inputs, reconstructions, heatmaps, and heatmaps over the masks
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

# Examples in the grid: the worst-scored good images and the best-scored defects say the
# most about where the model goes wrong, so both ends are shown.
GRID_ROWS = 8


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def plot_losses(losses_csv: Path, path: Path) -> bool:
    if not losses_csv.is_file():
        return False
    with open(losses_csv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return False
    plt = _plt()
    columns = [c for c in ("loss_d", "loss_g", "loss_eg", "loss_recon", "loss_feature", "val_loss") if c in rows[0]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for col in columns:
        pts = [(int(r["step"]), float(r[col])) for r in rows if r.get(col)]
        if not pts:
            continue
        steps, values = zip(*pts)
        target = axes[1] if col in ("loss_recon", "loss_feature", "val_loss") else axes[0]
        target.plot(steps, values, label=col, marker="o" if col == "val_loss" or len(pts) < 20 else None, markersize=3)
    axes[0].set_title("adversarial losses")
    axes[1].set_title("reconstruction / feature losses (val = held-out normals)")
    phases = [(int(r["step"]), r.get("phase", "")) for r in rows]
    switch = next((s for (s, ph), (_, prev) in zip(phases[1:], phases) if ph != prev), None)
    for ax in axes:
        ax.set_xlabel("step")
        if switch is not None:
            ax.axvline(switch, color="grey", linestyle=":", label="encoder phase starts")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_scores(scores: np.ndarray, labels: np.ndarray, held: np.ndarray | None, threshold: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    everything = np.concatenate([scores, held if held is not None else []])
    finite = everything[np.isfinite(everything)]
    bins = np.linspace(finite.min(), finite.max(), 40) if finite.size and finite.min() < finite.max() else 20
    if held is not None:
        ax.hist(held, bins=bins, alpha=0.4, color="tab:green", label=f"held-out normals (n={len(held)})")
    ax.hist(
        scores[labels == 0], bins=bins, alpha=0.55, color="tab:blue", label=f"test normal (n={(labels == 0).sum()})"
    )
    ax.hist(
        scores[labels == 1], bins=bins, alpha=0.55, color="tab:red", label=f"test anomalous (n={(labels == 1).sum()})"
    )
    if math.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("anomaly score A(x)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_roc_pr(scores: np.ndarray, labels: np.ndarray, path: Path) -> None:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    fpr, tpr, _ = roc_curve(labels, scores)
    a.plot(fpr, tpr, label=f"AUROC {roc_auc_score(labels, scores):.3f}")
    a.plot([0, 1], [0, 1], color="grey", linestyle=":")
    a.set_xlabel("false-positive rate (good parts rejected)")
    a.set_ylabel("true-positive rate (defects caught)")
    a.set_title("ROC")
    a.legend()
    precision, recall, _ = precision_recall_curve(labels, scores)
    b.plot(recall, precision, label=f"AUPRC {average_precision_score(labels, scores):.3f}")
    b.axhline(labels.mean(), color="grey", linestyle=":", label=f"chance {labels.mean():.2f}")
    b.set_xlabel("recall")
    b.set_ylabel("precision")
    b.set_title("precision-recall")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_lambda_sweep(sweep: list[dict[str, Any]], chosen: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    lam = [r["lambda"] for r in sweep]
    ax.plot(lam, [r["image_auroc"] for r in sweep], marker="o", label="image AUROC")
    ax.plot(lam, [r["image_auprc"] for r in sweep], marker="s", label="image AUPRC")
    if all(r.get("f1") is not None for r in sweep):
        ax.plot(lam, [r["f1"] for r in sweep], marker="^", label="F1 at the held-out (1-ν) threshold")
    ax.plot(lam, [r["f1_optimal"] for r in sweep], linestyle=":", marker=".", label="F1 at the best test threshold")
    ax.axvline(chosen, color="grey", linestyle="--", label=f"configured λ = {chosen:g}")
    ax.set_xlabel("λ in A(x) = (1 - λ) L_R + λ L_D")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _pick_examples(scores: np.ndarray, labels: np.ndarray, kinds: list[str], rows: int) -> list[int]:
    """Both ends of the story: the highest-scored good images and each defect kind's lowest and highest."""
    picked: list[int] = []
    good = np.flatnonzero(labels == 0)
    picked += list(good[np.argsort(-scores[good])][:2])
    for kind in sorted(set(k for k, y in zip(kinds, labels) if y == 1)):
        idx = np.flatnonzero((np.asarray(kinds) == kind) & (labels == 1))
        order = idx[np.argsort(scores[idx])]
        picked += [int(order[0])] + ([int(order[-1])] if len(order) > 1 else [])
    return picked[:rows] if len(picked) > rows else picked


def plot_examples(test: Any, scored: Any, labels: np.ndarray, threshold: float, path: Path) -> None:
    """A grid of test images: input, reconstruction, heatmap, and (with masks) the heatmap over the mask.

    `test` is the test set (images, masks, kinds) and `scored` its scores (score, heatmap, recon).
    """
    images, masks, kinds = test.images, test.masks, list(test.kinds)
    recon, heatmaps, scores = scored.recon, scored.heatmap, scored.score
    plt = _plt()
    rows = _pick_examples(scores, labels, kinds, GRID_ROWS)
    cols = 4 if masks is not None else 3
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.3 * cols, 2.3 * len(rows)), squeeze=False)
    gray = images[0].shape[-1] == 1

    def show(ax: Any, img: np.ndarray) -> None:
        if gray:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img[..., ::-1])  # BGR -> RGB for display

    for r, i in enumerate(rows):
        verdict = "NG" if scores[i] > threshold else "OK"
        show(axes[r, 0], images[i])
        axes[r, 0].set_title(f"{kinds[i]}: {scores[i]:.3g} {verdict}", fontsize=8)
        if recon is not None:
            show(axes[r, 1], recon[i])
        axes[r, 1].set_title("reconstruction", fontsize=8)
        axes[r, 2].imshow(heatmaps[i], cmap="inferno", vmin=0, vmax=max(1.0, float(heatmaps[i].max())))
        axes[r, 2].set_title(f"heatmap (peak {heatmaps[i].max():.2f})", fontsize=8)
        if masks is not None:
            show(axes[r, 3], images[i])
            axes[r, 3].imshow(heatmaps[i], cmap="inferno", alpha=0.5, vmin=0, vmax=1.0)
            if masks[i].any():
                axes[r, 3].contour(masks[i], levels=[0.5], colors="cyan", linewidths=0.8)
            axes[r, 3].set_title("heatmap over mask (cyan)", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(run: Path, metrics: dict[str, Any], test: Any, scored: Any, held: Any | None) -> Path:
    """Write the report folder of an evaluated run and return the Markdown file's path."""
    run = Path(run)
    folder = run / ("report" if metrics.get("scoring", "encoder") == "encoder" else "report_search")
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(test.labels).astype(int)
    both = len(np.unique(labels)) == 2
    figures: list[tuple[str, str]] = []
    if plot_losses(run / "losses.csv", folder / "losses.png"):
        figures.append(("Training losses", "losses.png"))
    plot_scores(scored.score, labels, None if held is None else held.score, metrics["threshold"], folder / "scores.png")
    figures.append(("Score histograms (seed 003's figure)", "scores.png"))
    if both:
        plot_roc_pr(scored.score, labels, folder / "roc_pr.png")
        figures.append(("ROC and precision-recall", "roc_pr.png"))
    if metrics.get("lambda_sweep"):
        plot_lambda_sweep(metrics["lambda_sweep"], metrics["lambda"], folder / "lambda_sweep.png")
        figures.append(("λ sweep (seed 000's figure)", "lambda_sweep.png"))
    plot_examples(test, scored, labels, metrics["threshold"], folder / "examples.png")
    figures.append(("Examples: input, reconstruction, heatmap, heatmap over the defect mask", "examples.png"))

    lines = [
        f"# Evaluation report: {run.resolve().name}",
        "",
        f"Model **{metrics.get('kind')}**, scoring **{metrics.get('scoring')}**, λ = {metrics.get('lambda')}, "
        f"L_D {metrics.get('discrimination')}, L_R {metrics.get('residual_reduction')}; test data `{metrics.get('data')}` "
        f"({metrics.get('n_test_good')} good, {metrics.get('n_test_bad')} defective).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| image AUROC | {_fmt(metrics.get('image_auroc'))} |",
        f"| image AUPRC | {_fmt(metrics.get('image_auprc'))} |",
        f"| pixel AUROC | {_fmt(metrics.get('pixel_auroc'))} |",
        f"| threshold | {_fmt(metrics.get('threshold'), 5)} ({metrics.get('threshold_method')}, ν = "
        f"{metrics.get('nu')}, {metrics.get('n_calibration')} held-out normals) |",
        f"| held-out false-alarm rate at the threshold | {_fmt(metrics.get('false_alarm_rate_held_out'))} |",
        f"| precision / recall / F1 at the threshold | {_fmt(metrics.get('precision'))} / "
        f"{_fmt(metrics.get('recall'))} / {_fmt(metrics.get('f1'))} |",
        f"| F1 at the F1-optimal test threshold (information only) | {_fmt(metrics.get('f1_at_f1_optimal'))} |",
    ]
    for kind, auc in (metrics.get("image_auroc_by_kind") or {}).items():
        lines.append(f"| AUROC, good vs {kind} | {_fmt(auc)} |")
    ocnn = metrics.get("ocnn")
    if ocnn:
        lines.append(
            f"| OC-NN on the latent codes (seed 004): AUROC / F1 at its boundary | "
            f"{_fmt(ocnn['image_auroc'])} / {_fmt(ocnn['f1'])} |"
        )
        lines.append(
            f"| rank average of the GAN score and the OC-NN score: AUROC | {_fmt(ocnn['combined_image_auroc'])} |"
        )
    if metrics.get("lambda_sweep"):
        lines += [
            "",
            "## λ sweep",
            "",
            "| λ | AUROC | AUPRC | F1 (held-out threshold) | F1 (best test threshold) |",
            "|---|---|---|---|---|",
        ]
        for r in metrics["lambda_sweep"]:
            lines.append(
                f"| {r['lambda']:.1f} | {_fmt(r['image_auroc'])} | {_fmt(r['image_auprc'])} | "
                f"{_fmt(r.get('f1'))} | {_fmt(r['f1_optimal'])} |"
            )
    for title, name in figures:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
