"""Results of a run (torch): :class:`Results` (tensors by name, files, summary), built from the
engine's output with its manifest by :func:`results_from_raw`; the terminal summary, heatmaps,
the ``expect:`` verdicts (:class:`Outcome`), run comparison (:func:`compare_runs`) and the
run's HTML page (:func:`write_report`).
"""

from .compare import BLOCKING_FIELDS, RunDiff, TensorDiff, compare_runs
from .expect import Outcome, evaluate
from .folder import check_out_dir, write_folder
from .labels import axis_labels, cell_label, coords
from .manifest import results_from_raw
from .report import REPORT_FILE, render_report, write_report
from .results import MANIFEST_FILE, RESULTS_FILE, Results, tensor_sha256
from .summary import print_summary, render_summary

__all__ = [
    "BLOCKING_FIELDS",
    "MANIFEST_FILE",
    "REPORT_FILE",
    "RESULTS_FILE",
    "Outcome",
    "Results",
    "RunDiff",
    "TensorDiff",
    "axis_labels",
    "check_out_dir",
    "cell_label",
    "compare_runs",
    "coords",
    "evaluate",
    "print_summary",
    "render_report",
    "render_summary",
    "results_from_raw",
    "tensor_sha256",
    "write_folder",
    "write_report",
]
