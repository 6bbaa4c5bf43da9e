"""Spec v1: reading an experiment file into a validated :class:`Spec` (no torch).

- :func:`load_file` / :func:`load_text` / :func:`from_data`: strict YAML/JSON loading into plain
  data and a :class:`SourceMap` (every value's line and column), as a :class:`LoadedDoc`;
- :func:`validate_spec`: the pydantic models (:class:`Spec` and its parts), with every problem
  reported as a located :class:`~specsight.errors.Issue`; :func:`load_spec` does both steps
  and :func:`doc_of` gives the document a spec came from;
- :func:`json_schema`: the JSON Schema of the format (``schemas/spec.v1.json``).
"""

from .base import (
    NAME_PATTERN,
    PLACEHOLDER_PATTERN,
    SPEC_VERSION,
    Positions,
    PositionSelector,
    TokenRef,
    TokenSelector,
)
from .document import (
    INPUT_KINDS,
    Dataset,
    FileTensor,
    Generate,
    Invoke,
    ModelRef,
    Sample,
    Sampling,
    Spec,
    json_schema,
)
from .load import from_data, load_file, load_text
from .metrics import (
    METRIC_CLASSES,
    METRIC_KINDS,
    AttributionMetric,
    Backward,
    Expectation,
    LogitDiffMetric,
    LogitLensMetric,
    LogitsMetric,
    LogprobMetric,
    Metric,
    ProbMetric,
    RecoveryMetric,
    Reduce,
    TopKMetric,
)
from .ops import (
    OP_CLASSES,
    OP_NAMES,
    AddOp,
    FileVector,
    Op,
    PatchOp,
    SavedVector,
    SaveOp,
    ScaleOp,
    SetOp,
    SiteOp,
    ZeroOp,
)
from .source import MAX_BYTES, MAX_DEPTH, LoadedDoc, SourceMap
from .validate import doc_of, document_of, load_spec, validate_spec

__all__ = [
    "SPEC_VERSION",
    "NAME_PATTERN",
    "PLACEHOLDER_PATTERN",
    "MAX_BYTES",
    "MAX_DEPTH",
    "LoadedDoc",
    "SourceMap",
    "load_file",
    "load_text",
    "from_data",
    "validate_spec",
    "load_spec",
    "doc_of",
    "document_of",
    "json_schema",
    "Spec",
    "ModelRef",
    "Invoke",
    "INPUT_KINDS",
    "Dataset",
    "Sample",
    "Generate",
    "Sampling",
    "FileTensor",
    "TokenSelector",
    "PositionSelector",
    "Positions",
    "TokenRef",
    "Op",
    "SiteOp",
    "SaveOp",
    "ZeroOp",
    "ScaleOp",
    "AddOp",
    "SetOp",
    "PatchOp",
    "FileVector",
    "SavedVector",
    "OP_CLASSES",
    "OP_NAMES",
    "Metric",
    "LogitsMetric",
    "LogprobMetric",
    "ProbMetric",
    "LogitDiffMetric",
    "TopKMetric",
    "LogitLensMetric",
    "RecoveryMetric",
    "Reduce",
    "AttributionMetric",
    "METRIC_CLASSES",
    "METRIC_KINDS",
    "Expectation",
    "Backward",
]
