"""The report of an evaluation: the per-image CSV, the terminal table and ``metrics.md``."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence


def per_image_csv(ids: Sequence[str], rows: dict, names: Sequence[str]) -> str:
    """``id, pixel_acc, IoU of each class`` (percentages; empty where the class is neither in
    the image's ground truth nor predicted, i.e. only the present classes have a value)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "pixel_acc", *[f"iou_{name}" for name in names]])
    fmt = lambda v: "" if v is None else f"{100.0 * v:.4f}"  # noqa: E731
    for image_id in ids:
        if image_id in rows:
            acc, ious = rows[image_id]
            writer.writerow([image_id, fmt(acc), *map(fmt, ious)])
    return buffer.getvalue()


def _fmt(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def format_table(metrics: dict) -> str:
    """The per-class IoU table and the summary, as plain text for the terminal."""
    width = max(len(c["name"]) for c in metrics["per_class"])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'acc':>6}"]
    for c in metrics["per_class"]:
        mark = "" if c["present"] else "  (not in GT)"
        lines.append(f"{c['name']:<{width}}  {_fmt(c['iou']):>6}  {_fmt(c['acc']):>6}{mark}")
    diff = metrics["difference"]
    lines += [
        "",
        f"{metrics['task']}: mIoU {_fmt(metrics['miou'])} (paper {metrics['paper_miou']:.1f}, "
        f"{'–' if diff is None else f'{diff:+.2f}'})  mIoU(mmseg) {_fmt(metrics['miou_mmseg'])}  "
        f"pixAcc {_fmt(metrics['pixel_acc'])}  mAcc {_fmt(metrics['mean_acc'])}",
        f"images: {metrics['images_scored']} scored, {metrics['images_skipped']} skipped (background only), "
        f"{metrics['images_missing']} missing, {metrics['images_error']} with errors, of {metrics['images']}",
        *_notes(metrics),
    ]
    return "\n".join(lines)


def _notes(metrics: dict) -> list[str]:
    """The lines that say what else shaped the figure: Context-59, tag coverage, DiffSeg's
    dropped anchors."""
    notes = []
    if metrics.get("miou_context59") is not None:
        notes.append(f"mIoU Context-59 (MMSegmentation, background ignored): {_fmt(metrics['miou_context59'])}")
    if metrics.get("images_untagged") is not None:
        notes.append(
            f"tags: {metrics['tags_cover']}; {metrics['images_untagged']} image(s) of this run had no tags "
            "and were predicted all background (counted in the figure)"
        )
    if metrics.get("first_pass") is not None:
        notes.append(
            f"DiffSeg first pass: {metrics['first_pass']}; {metrics['anchors_dropped']} anchor(s) dropped for "
            f"fp16 underflow in {metrics['images_with_anchors_dropped']} image(s)"
        )
    return notes


_PROTOCOLS = (
    "- **mIoU (authors)**: the authors' `ShowSegmentResult`: one confusion matrix summed over the images "
    "scored (background-only images skipped in WSSS), ground truth 255 ignored, background a class, "
    "mean IoU over the classes present in the ground truth (`rowsum > 0`).",
    "- **mIoU (MMSegmentation, all images)**: MMSegmentation's `IoUMetric` on the same predictions: "
    "each image's intersect / union / prediction / label areas summed over *all* images of the run "
    "(WSSS background-only images included, predicted all background), `IoU = Σ intersect / Σ union`, "
    "NaN-mean over the classes with `union > 0` (a class only predicted counts with IoU 0).",
    "- **mIoU Context-59** (Pascal Context only): MMSegmentation's `PascalContextDataset59` "
    "(`reduce_zero_label`): ground-truth background ignored, the 59 classes averaged as above; a "
    "pixel predicted background counts in its true class's union.",
    "- **pixel accuracy / mean accuracy**: `trace / total` and the mean per-class recall over the "
    "classes present, from the authors' matrix. `per_image.csv`: each image's pixel accuracy and "
    "IoU of each class in its ground truth or prediction.",
)
_PROTOCOLS_HUNGARIAN = (
    "- **mIoU / pixel accuracy (DiffSeg)**: per image, the predicted segments are matched one-to-one "
    "to the 27 classes by `linear_sum_assignment` on the image's confusion matrix; TP, FP, FN and the "
    "pixel count are summed over the dataset; mIoU = NaN-mean of TP / (TP + FP + FN), accuracy = "
    "ΣTP / Σpixels (DiffSeg's benchmark notebook). `per_image.csv`: the same per image.",
)


def format_markdown(metrics: dict) -> str:
    """``metrics.md``: the summary beside the paper's figure, then the per-class table."""
    diff = metrics["difference"]
    hungarian = metrics.get("metric", "").startswith("Hungarian")
    miou_label = "mIoU (Hungarian-matched per image)" if hungarian else "mIoU (authors: classes in GT)"
    lines = [
        f"# iseg eval {metrics['task']} ({metrics['table']})",
        "",
        f"Recipe `{metrics['settings'].get('recipe', '?')}`, {metrics['layout']}, "
        f"{metrics['images_scored']} of {metrics['images']} images scored "
        f"({metrics['images_skipped']} background-only skipped, {metrics['images_missing']} missing, "
        f"{metrics['images_error']} errors).",
        "",
        "| metric | ours | paper | difference |",
        "|---|---:|---:|---:|",
        f"| {miou_label} | {_fmt(metrics['miou'])} | {metrics['paper_miou']:.1f} | "
        f"{'–' if diff is None else f'{diff:+.2f}'} |",
        *([] if hungarian else [f"| mIoU (MMSegmentation, all images) | {_fmt(metrics['miou_mmseg'])} | | |"]),
        *([f"| mIoU Context-59 (MMSegmentation, background ignored) | {_fmt(metrics['miou_context59'])} | | |"]
          if metrics.get("miou_context59") is not None else []),
        f"| pixel accuracy | {_fmt(metrics['pixel_acc'])} | | |",
        f"| mean accuracy | {_fmt(metrics['mean_acc'])} | | |",
        "",
        *[f"{line}." for line in _notes(metrics)[1 if metrics.get("miou_context59") is not None else 0:]],
        "",
        "## Protocols",
        "",
        *(_PROTOCOLS_HUNGARIAN if hungarian else _PROTOCOLS),
        "",
        "| id | class | IoU | acc | in GT |",
        "|---:|---|---:|---:|:---:|",
    ]
    for c in metrics["per_class"]:
        lines.append(f"| {c['id']} | {c['name']} | {_fmt(c['iou'])} | {_fmt(c['acc'])} | {'yes' if c['present'] else 'no'} |")
    if metrics["failures"]:
        lines += ["", "## Images not scored", ""]
        lines += [f"- `{k}`: {v}" for k, v in metrics["failures"].items()]
    return "\n".join(lines) + "\n"
