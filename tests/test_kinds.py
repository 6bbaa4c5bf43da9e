"""Each kind's code in one place: every metric kind of the spec has one record class in the
plan that compiles, reads and describes it, every spec op compiles through one table, and the
rest of the package dispatches on record types instead of branching on kind names."""

from __future__ import annotations

import re

import pytest

from specsight import spec as S
from specsight.compile.ops import _COMPILERS  # noqa: PLC2701 - the table under test
from specsight.plan import Metric, Op, metric_kind
from specsight.plan.codec import kinds_of
from tests.test_architecture import MODULES

#: modules that may name a metric kind: the spec's model of it, and its plan module
MAX_MODULES_PER_KIND = 3
MAX_KIND_BRANCHES = 20


def test_every_spec_metric_kind_has_a_plan_record():
    for tag in S.METRIC_KINDS:
        kind = metric_kind(tag)
        assert issubclass(kind, Metric) and kind.kind == tag
        assert callable(getattr(kind, "compile", None)), tag
        assert kind.explain is not Metric.explain, f"{tag} says nothing in `specsight plan`"


def test_every_spec_op_compiles_through_the_table():
    assert set(_COMPILERS) == set(S.OP_CLASSES.values())


def test_op_kinds_apply_one_way_or_the_other():
    """A kind either batches (prepare + write) or applies op by op; never neither."""
    for tag, kind in kinds_of(Op).items():
        batches = kind.write is not Op.write
        applies = kind.apply is not Op.apply
        assert batches or applies, tag


@pytest.mark.parametrize("tag", ["logit_lens"])
def test_a_metric_kind_is_named_in_few_modules(tag):
    """The spec's model of the kind and its plan module (most kinds' names are words that
    docstrings and messages use too, such as ``logits`` or ``loss``: the lens is not)."""
    pattern = re.compile(rf"\b{tag}\b")
    naming = [
        name for name, path in MODULES.items() if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert len(naming) <= MAX_MODULES_PER_KIND, f"{tag} is named in {naming}"


def test_the_package_dispatches_on_record_types_not_kind_names():
    branches = [
        f"{name}: {line.strip()}"
        for name, path in MODULES.items()
        if not name.startswith("specsight.spec")
        for line in path.read_text(encoding="utf-8").splitlines()
        if re.search(r"kind ==|kind in", line)
    ]
    assert len(branches) <= MAX_KIND_BRANCHES, "\n".join(branches)
