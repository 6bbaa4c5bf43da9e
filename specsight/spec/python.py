"""Python functions in a spec (local runs only): a metric computed by a function of each row's
next-token logits (``{kind: python, fn: entropy, invoke: clean}``) and an op that passes a
site's values through a function (``{op: python, fn: halve, site: mlp_out.3}``).

A spec names each function; ``specsight.run(spec, functions={"entropy": fn})`` supplies them.
A spec names code, it never holds it: the command line and servers, which run no code, refuse
these kinds with a located error that says why.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..errors import Issue, SpecError
from .base import NAME_PATTERN, SITE_SYNTAX
from .metric_kinds import MetricBase
from .source import LoadedDoc

__all__ = ["FN_FIELD", "PythonMetric", "python_functions", "python_refusal"]

FN_FIELD = Field(
    pattern=NAME_PATTERN,
    description="the name of a Python function given to specsight.run(..., functions={name: fn})",
)


class PythonMetric(MetricBase):
    """One value per row from a Python function of the row's next-token logits at
    ``position`` ([rows, vocab] in, [rows] out), batched like the built-in metrics; with
    ``site``, of the values the rows hold there at ``position`` instead ([rows, width])."""

    kind: Literal["python"]
    fn: str = FN_FIELD
    site: str | None = Field(
        None,
        description="a site (one) whose values at 'position' the function gets instead of the "
        "logits: [rows, width], after the run",
        json_schema_extra={
            "description": "a site (one) whose values at 'position' the function gets instead "
            f"of the logits ([rows, width], after the run). {SITE_SYNTAX}",
            "examples": ["resid_post.6", "mlp_out.{layer}", "model.layers.5.mlp"],
        },
    )


def python_functions(spec: Any) -> list[tuple[tuple[Any, ...], str]]:
    """Every Python function a spec names, with the path of its ``fn`` field."""
    out: list[tuple[tuple[Any, ...], str]] = []
    for name, invoke in spec.invokes.items():
        for index, op in enumerate(invoke.ops or ()):
            if getattr(op, "op", None) == "python":
                out.append((("invokes", name, "ops", index, "fn"), op.fn))
    for name, metric in spec.metrics.items():
        if isinstance(metric, PythonMetric):
            out.append((("metrics", name, "fn"), metric.fn))
    return out


def python_refusal(
    spec: Any, doc: LoadedDoc | None, given: Any = None, where: str | None = None
) -> None:
    """Raise one located SpecError for the functions a spec names that ``given`` (names to
    functions) lacks; with ``where`` (what refuses: "a server"), for every function named."""
    issues = []
    for path, fn in python_functions(spec):
        if where is None and given is not None and fn in given:
            continue
        if where is not None:
            message = f"'{fn}' names a Python function: {where} runs no code"
            hint = (
                f"run this spec locally in Python: specsight.run(spec, functions={{'{fn}': ...}})"
            )
        else:
            message = f"'{fn}' names a Python function, which this run was not given"
            hint = (
                f"in Python: specsight.run(spec, functions={{'{fn}': {fn}}}); the command line "
                "and servers run no code"
            )
        if doc is None:
            issues.append(Issue("python-function", message, path, None, None, None, hint))
        else:
            issues.append(doc.source.issue("python-function", message, path, hint=hint))
    if issues:
        raise SpecError(issues)
