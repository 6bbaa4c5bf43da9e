"""Validation with located errors: loaded spec data becomes a :class:`Spec`, or one SpecError
listing every problem with where it is (file:line:col and path), what, and how to fix it.

Where no branch of a union fits, the branches that got furthest into the data are kept; a
typo'd key and the missing key it stands for count as one problem. Each remaining group of
pydantic errors is put into words by :func:`.issues.issue_for`.

:func:`load_spec` loads and validates in one step; the spec carries the document it came from
(``Spec.document``, :func:`doc_of`), so later errors (compiling, a server's answer) can still
name file positions.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import ValidationError

from ..errors import MAX_ISSUES, Issue, SpecError, did_you_mean
from .base import SPEC_VERSION
from .document import Spec
from .issues import data_path, describe_value, issue_for
from .load import from_data, load_file
from .source import LoadedDoc

__all__ = ["validate_spec", "load_spec", "doc_of", "document_of"]


def validate_spec(doc: LoadedDoc) -> Spec:
    """Validate loaded data into a :class:`Spec`, or raise one SpecError with every problem."""
    data = doc.data
    if isinstance(data, dict) and "specsight" in data:
        version = data["specsight"]
        line, col = doc.source.locate(("specsight",))
        if isinstance(version, bool) or not isinstance(version, (int, float)):
            message = (
                f"expected the spec format version {SPEC_VERSION}, got {describe_value(version)}"
            )
            hint = f"write 'specsight: {SPEC_VERSION}', a number"
            raise SpecError(Issue("version", message, ("specsight",), doc.file, line, col, hint))
        if version != SPEC_VERSION:
            message = (
                f"this is spec format version {describe_value(version)}; "
                f"this specsight reads version {SPEC_VERSION}"
            )
            hint = f"upgrade specsight, or write 'specsight: {SPEC_VERSION}'"
            raise SpecError(Issue("version", message, ("specsight",), doc.file, line, col, hint))
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)

    raise SpecError(_issues(errors, data, doc)) from None


def _issues(errors: list[dict[str, Any]], data: Any, doc: LoadedDoc) -> list[Issue]:
    """The located issues standing for pydantic's errors, at most MAX_ISSUES (then one that
    counts the rest), in time linear in the number of errors."""
    # Where no branch of a union fits, keep the branches that got furthest into the data (for
    # a list of prompts holding one number: the list branch's error about that item, not the
    # string branch's error about the whole list); among those, the ones with the fewest
    # errors, a typo'd key and the key it stands for counting as one.
    found: list[tuple[dict[str, Any], tuple[Any, ...]]] = []
    members: dict[tuple[Any, ...], dict[Any, list[int]]] = {}  # union point -> branch -> errors
    missing_in: dict[tuple[Any, ...], list[int]] = {}  # mapping (as a loc) -> missing keys
    for index, err in enumerate(errors):
        loc = tuple(err["loc"])
        dropped: list[tuple[int, Any]] = []
        path = data_path(loc, data, dropped)
        found.append((err, path))
        if err["type"] == "missing":
            missing_in.setdefault(loc[:-1], []).append(index)
        for i, part in dropped:
            if part != "[key]" and not (err["type"] == "missing" and i == len(loc) - 1):
                members.setdefault(loc[:i], {}).setdefault(part, []).append(index)

    def typo_of(extra: int, among: set[int] | None = None) -> int | None:
        """The missing-key error (among ``among``) that unknown key ``extra`` stands for."""
        e, e_path = found[extra]
        if e["type"] != "extra_forbidden":
            return None
        for missing in missing_in.get(tuple(e["loc"][:-1]), ()):
            if among is not None and missing not in among:
                continue
            wanted = str(found[missing][0]["loc"][-1])
            if did_you_mean(str(e_path[-1]), [wanted]) is not None:
                return missing
        return None

    def depth(index: int) -> int:
        err, path = found[index]
        return len(path) + (err["type"] == "missing")  # a missing key lies inside its mapping

    def cost(indices: list[int]) -> int:
        among = set(indices)
        return len(indices) - sum(typo_of(i, among) is not None for i in indices)

    dropped_errors: set[int] = set()
    exclusive: dict[tuple[Any, ...], list[int]] = {}  # mapping path -> keys of rival branches
    for branches in members.values():
        if len(branches) < 2:
            continue
        deepest = {tag: max(depth(i) for i in indices) for tag, indices in branches.items()}
        finalists = [tag for tag in branches if deepest[tag] == max(deepest.values())]
        costs = {tag: cost(branches[tag]) for tag in finalists}
        winners = [tag for tag in finalists if costs[tag] == min(costs.values())]
        for tag, indices in branches.items():
            if tag not in winners:
                dropped_errors.update(indices)
        rest = [i for tag in winners for i in branches[tag]]
        if len(winners) > 1 and all(found[i][0]["type"] == "extra_forbidden" for i in rest):
            # e.g. {file: ..., saved: ...}: each branch of the union refuses the other's key
            exclusive.setdefault(found[rest[0]][1][:-1], []).extend(rest)
            dropped_errors.update(rest)

    # A typo'd key also leaves the key it stands for missing: report the typo only.
    meant: dict[tuple[Any, ...], str] = {}
    live = set(range(len(found))) - dropped_errors
    for i in sorted(live):
        j = typo_of(i, live)
        if j is not None:
            meant.setdefault(found[i][1], str(found[j][0]["loc"][-1]))
    covered = {(path[:-1], wanted) for path, wanted in meant.items()}

    grouped: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for index in sorted(live):
        err, path = found[index]
        kind = err["type"]
        if kind == "missing" and (path, str(err["loc"][-1])) in covered:
            continue
        alone = tuple(err["loc"]) if kind in ("union_tag_invalid", "union_tag_not_found") else ()
        grouped.setdefault(
            (path, alone, kind if kind in ("missing", "extra_forbidden") else ""), []
        ).append(err)
    issues: dict[Issue, None] = {}
    for path, indices in exclusive.items():
        keys = sorted({str(found[i][1][-1]) for i in indices})
        message = "give either " + " or ".join(f"'{k}'" for k in keys) + ", not both"
        if len(keys) > 2:
            message = "give only one of " + ", ".join(f"'{k}'" for k in keys)
        line, col = doc.source.locate(path, key=True)
        issues[Issue("bad-value", message, path, doc.file, line, col)] = None
    # put only the first groups into words: a spec with thousands of problems gets MAX_ISSUES
    order = sorted(
        grouped, key=lambda key: tuple(v or 0 for v in doc.source.locate(key[0], key=True))
    )
    for key in order:
        if len(issues) >= MAX_ISSUES:
            break
        issue, at_key = issue_for(grouped[key], key[0], data)
        if issue.code == "unknown-key" and issue.path in meant:
            hint = f"did you mean '{meant[issue.path]}'?"
            issue = Issue(issue.code, issue.message, issue.path, hint=hint)
        line, col = doc.source.locate(issue.path, key=at_key)
        issues[issue.located(doc.file, line, col)] = None
    shown = sorted(issues, key=lambda i: (i.line or 0, i.col or 0))
    more = len(exclusive) + len(grouped) - len(shown)
    if more > 0:
        message = f"and {more} more problems like these, not listed"
        shown.append(Issue("more-issues", message, (), doc.file, hint="fix these first"))
    return shown


def doc_of(spec: Spec) -> LoadedDoc | None:
    """The loaded document a spec came from (for file positions in later errors)."""
    return spec.document


def load_spec(source: str | os.PathLike[str] | dict[str, Any]) -> Spec:
    """Load and validate a spec from a file path or a dict. Raises SpecError."""
    doc = from_data(source) if isinstance(source, dict) else load_file(source)
    spec = validate_spec(doc)
    spec._document = doc
    return spec


def document_of(spec: Spec) -> LoadedDoc:
    """The document a spec came from, or (for a spec built in Python) its data as a document:
    what the plan and the manifest hash."""
    return doc_of(spec) or from_data(spec.model_dump(by_alias=True, exclude_none=True))
