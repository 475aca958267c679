"""Evaluation as in the paper's tables, one module per job:

* :mod:`.metrics` — confusion matrices, the authors' and MMSegmentation's mIoU, DiffSeg's
  per-image Hungarian matching;
* :mod:`.tasks` — the tasks (dataset, split, mode, classes) and the built-in tagger of OVS runs;
* :mod:`.samples` — per-image work in DataLoader workers (images, ground truth, saved predictions);
* :mod:`.running` — the resumable ``iseg eval`` runner (:func:`run_eval`) and scoring (:func:`score`);
* :mod:`.report` — the per-image CSV, the terminal table and ``metrics.md``.
"""

from .metrics import (
    HungarianScores,
    SegmentationScores,
    confusion_matrix,
    hungarian_match,
    hungarian_scores,
    mmseg_miou,
    scores,
)
from .report import format_markdown, format_table
from .running import EvalResult, run_eval, score
from .tasks import EvalError, Task, builtin_tagger, get_task

__all__ = [
    "EvalError", "EvalResult", "HungarianScores", "SegmentationScores", "Task", "builtin_tagger",
    "confusion_matrix", "format_markdown", "format_table", "get_task", "hungarian_match",
    "hungarian_scores", "mmseg_miou", "run_eval", "score", "scores",
]  # fmt: skip
