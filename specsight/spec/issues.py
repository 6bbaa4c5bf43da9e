"""Pydantic's errors about one place in a spec, in words: one :class:`Issue` saying what was
expected there and how to fix it (did-you-mean on keys and names, the allowed keys, the kind of
value a field takes)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from ..errors import Issue, did_you_mean
from .base import TokenSelector
from .document import Invoke, ModelRef, Spec
from .metrics import METRIC_CLASSES, METRIC_KINDS
from .ops import OP_CLASSES, OP_NAMES, FileVector, MeanDiffVector, SavedVector

__all__ = ["data_path", "describe_value", "issue_for"]


def _child(node: Any, key: Any) -> tuple[bool, Any]:
    if isinstance(node, dict) and key in node:
        return True, node[key]
    if isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
        return True, node[key]
    return False, None


def data_path(
    loc: tuple[Any, ...], data: Any, dropped: list[tuple[int, Any]] | None = None
) -> tuple[Any, ...]:
    """Keep only the parts of a pydantic loc that exist in the data. The parts left out are
    union branch tags (``'str'``, ``'list[...]'``, a discriminator value), the ``'[key]'`` marker
    of dict-key errors and the name of a missing key; each is appended to ``dropped`` (when
    given) as ``(index in loc, part)``."""
    path: list[Any] = []
    node = data
    for index, part in enumerate(loc):
        found, child = _child(node, part)
        if found:
            path.append(part)
            node = child
        elif dropped is not None:
            dropped.append((index, part))
    return tuple(path)


def _model_at(path: tuple[Any, ...], data: Any) -> type[BaseModel] | None:
    """The pydantic class that validates the mapping at ``path`` (for did-you-mean on keys)."""
    cls: type[BaseModel] | None = Spec
    node = data
    i = 0
    while i < len(path) and cls is not None:
        part = path[i]
        _, node_child = _child(node, part)
        if cls is Spec and part == "invokes" and i + 1 < len(path):
            cls, i = Invoke, i + 2
            node = _child(node_child, path[i - 1])[1]
            continue
        if cls is Spec and part == "metrics" and i + 1 < len(path):
            metric = _child(node_child, path[i + 1])[1]
            kind = metric.get("kind") if isinstance(metric, dict) else None
            cls, i, node = METRIC_CLASSES.get(kind), i + 2, metric
            continue
        if cls is Spec and part == "model":
            cls, i, node = ModelRef, i + 1, node_child
            continue
        if cls is Invoke and part == "ops" and i + 1 < len(path):
            op = _child(node_child, path[i + 1])[1]
            name = op.get("op") if isinstance(op, dict) else None
            cls, i, node = OP_CLASSES.get(name), i + 2, op
            continue
        if part == "positions" or part == "source_positions" or part == "position":
            cls = TokenSelector
            node = node_child
            i += 1
            while i < len(path) and isinstance(path[i], int):
                node = _child(node, path[i])[1]
                i += 1
            continue
        if part in ("vector", "value"):
            keys = node_child if isinstance(node_child, dict) else {}
            cls = (
                SavedVector
                if "saved" in keys
                else MeanDiffVector
                if "mean_diff" in keys
                else FileVector
            )
            i, node = i + 1, node_child
            continue
        return None
    return cls


def _keys_of(cls: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in cls.model_fields.items()]


def describe_value(value: Any) -> str:
    """A short rendering of a spec value, in the spelling a YAML or JSON author knows."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value) if len(value) <= 30 else repr(value[:30] + "...")
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def issue_for(errs: list[dict[str, Any]], path: tuple[Any, ...], data: Any) -> tuple[Issue, bool]:
    """Translate the pydantic errors about one place in the spec into one issue. ``errs`` holds
    one error, one per branch of a union when no branch fits, or every missing key of one
    mapping. Returns (issue, located at the key rather than at the value?)."""
    type_words = {
        "string_type": "a string",
        "int_type": "an integer",
        "int_parsing": "an integer",
        "int_from_float": "an integer",
        "float_type": "a number",
        "float_parsing": "a number",
        "bool_type": "true or false",
        "bool_parsing": "true or false",
        "list_type": "a list",
        "dict_type": "a mapping",
        "model_type": "a mapping",
        "model_attributes_type": "a mapping",
        "none_required": "null",
    }
    # errors that say "wrong kind of value" rather than "right kind, bad value"
    wrong_kind = set(type_words) | {"literal_error", "string_pattern_mismatch", "union_tag_invalid"}
    position = "an integer, 'all', 'first', 'last', a slice such as '2:5', or {token: ' John'}"
    token = "a token string such as ' Paris' or a token id"
    fields = {  # field -> (what the field holds, what one item of it holds)
        "prompt": ("a prompt string or a list of prompt strings", "a prompt string"),
        "positions": (
            f"a position ({position}) or a list of positions",
            f"a position ({position})",
        ),
        "position": (f"a position ({position})", None),
        "factor": ("a number or a placeholder such as '{factor}'", None),
        "coeff": ("a number or a placeholder such as '{coeff}'", None),
        "vector": ("a list of numbers, {file: 'vector.npy'} or {saved: NAME}", "a number"),
        "target": (token, None),
        "foil": (token, None),
        "token": (token, None),
        "tokens": ("a list of tokens", token),
        "model": ("a model id or a mapping with 'id'", None),
        "sweep": ("a mapping of sweep variables to their values", None),
    }
    fields["source_positions"] = fields["positions"]
    fields["value"] = fields["vector"]
    named = path[:1] in (("invokes",), ("metrics",))  # then path[1] is a name the user chose

    def expected() -> str | None:
        """What the field at ``path`` holds, in words; None when the table does not know it."""
        if not path or (named and len(path) == 2):
            return None
        if named and len(path) >= 4 and path[2] == "sweep":
            return (
                "'all', a range such as '0:4', or a list of numbers"
                if len(path) == 4
                else "a number"
            )
        names = [p for p in (path[2:] if named else path) if isinstance(p, str)]
        if not names:
            return None
        if names[-1] == "token" and any(
            p in ("positions", "source_positions", "position") for p in path
        ):
            return "a token string such as ' John'"
        whole, item = fields.get(names[-1], (None, None))
        return item if isinstance(path[-1], int) else whole

    err = errs[0]
    if err["type"] == "missing":
        keys = [str(e["loc"][-1]) for e in errs]
        quoted = [f"'{k}'" for k in keys]
        cls = _model_at(path, data)
        hint = None
        if keys == ["specsight"] and not path:
            hint = "add 'specsight: 1', the spec format version, as the first line"
        elif len(keys) == 1 and cls is not None:
            field = next(
                (f for n, f in cls.model_fields.items() if (f.alias or n) == keys[0]), None
            )
            if field is not None and field.description:
                hint = f"add '{keys[0]}:', {field.description}"
        if len(keys) == 1:
            message = f"missing required key {quoted[0]}"
        elif len({tuple(e["loc"][:-1]) for e in errs}) == 1:  # one mapping lacks them all
            message = "missing required keys " + ", ".join(quoted[:-1]) + " and " + quoted[-1]
        else:  # each branch of a union lacks its own key
            message = "missing required key " + ", ".join(quoted[:-1]) + " or " + quoted[-1]
        return Issue("missing-key", message, path, hint=hint), True
    if len(errs) > 1:
        precise = [e for e in errs if e["type"] not in wrong_kind]
        if len(precise) == 1:  # the one branch whose type fits says what is wrong
            err, errs = precise[0], precise
    kind = err["type"]
    loc = tuple(err["loc"])
    ctx = err.get("ctx") or {}
    value = err.get("input")
    shown = describe_value(value)
    at_key = isinstance(value, (dict, list))

    if kind == "extra_forbidden":
        key = loc[-1]
        branches = (TokenSelector, FileVector, SavedVector, MeanDiffVector)
        branch_classes = {c.__name__: c for c in branches}
        classes: list[type[BaseModel]] = []
        for e in errs:  # one error per branch of a union that refused the key
            e_loc = tuple(e["loc"])
            cls = branch_classes.get(str(e_loc[-2])) if len(e_loc) >= 2 else None
            cls = cls or _model_at(path[:-1], data)
            if cls is not None and cls not in classes:
                classes.append(cls)
        allowed = [k for c in classes for k in _keys_of(c)]
        hint = did_you_mean(str(key), allowed) if allowed else None
        if hint is None and classes:
            hint = "allowed keys: " + " or ".join(", ".join(_keys_of(c)) for c in classes)
        if path == ("probes",):  # the result namespace, claims and reports are the metrics'
            hint = "probes are metrics: write each under metrics: with kind: probe"
        return Issue("unknown-key", f"unknown key '{key}'", path, hint=hint), True
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        field = "op" if path[:1] == ("invokes",) else "kind"
        tags = list(OP_NAMES if field == "op" else METRIC_KINDS)
        if kind == "union_tag_not_found":
            hint = f"say which {field}: " + ", ".join(tags)
            return Issue("missing-key", f"missing required key '{field}'", path, hint=hint), True
        tag = value.get(field) if isinstance(value, dict) else ctx.get("tag")
        code = "unknown-op" if field == "op" else "unknown-metric"
        hint = did_you_mean(str(tag), tags) or "one of: " + ", ".join(tags)
        where = path + (field,)
        if isinstance(tag, str):
            return Issue(code, f"unknown {field} '{tag}'", where, hint=hint), False
        what = "an op" if field == "op" else "a metric kind"
        message = f"expected the name of {what}, got {describe_value(tag)}"
        return Issue(code, message, where, hint=hint), False

    if len(errs) > 1:  # no branch of a union fits: say what would
        what = expected()
        if what is None:
            words: list[str] = []
            for e in errs:
                word = type_words.get(e["type"])
                if e["type"] == "literal_error":
                    word = str((e.get("ctx") or {}).get("expected"))
                if word and word not in words:
                    words.append(word)
            if not words:
                words = ["another kind of value"]
            what = ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
        hint = None
        is_vector = bool(path) and path[-1] in ("vector", "value")
        if is_vector and isinstance(value, str) and value.endswith((".npy", ".safetensors")):
            hint = f"a vector from a file is written {{file: {value}}}"
        return Issue("bad-value", f"expected {what}, got {shown}", path, hint=hint), at_key

    if kind in type_words:
        what = expected() or type_words[kind]
        hint = None
        cls = _model_at(path, data) if kind == "model_type" else None
        if cls is Invoke and isinstance(value, str):
            hint = "an invoke is a mapping: put the text under 'prompt:'"
        elif kind == "model_type" and cls is not None:
            hint = "keys: " + ", ".join(_keys_of(cls))
        return Issue("bad-value", f"expected {what}, got {shown}", path, hint=hint), at_key
    if kind == "finite_number":
        return Issue("bad-value", f"expected a finite number, got {shown}", path), False
    if kind == "literal_error":
        expected_text = str(ctx.get("expected", ""))
        options = [a or b for a, b in re.findall(r"'([^']*)'|(\d+)", expected_text)]
        hint = did_you_mean(str(value), options, n=1) if isinstance(value, str) else None
        message = f"expected {expected_text}, got {shown}"
        return Issue("bad-value", message, path, hint=hint), False
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "[key]":
        owner = path[-2] if len(path) >= 2 else None
        what, allowed = {
            "invokes": ("invoke name", "letters, digits, _ and -"),
            "metrics": ("metric name", "letters, digits, _ and -"),
            "sweep": ("sweep variable name", "letters, digits and _"),
        }.get(owner, ("name", "letters, digits, _ and -"))
        name = str(value)
        fixed = re.sub(r"[^A-Za-z0-9_]+" if owner == "sweep" else r"[^A-Za-z0-9_-]+", "_", name)
        fixed = fixed if re.match(r"[A-Za-z_]", fixed) else "_" + fixed
        message = f"{what} {name!r} is not valid: use {allowed}"
        if not re.match(r"[A-Za-z_]", name):
            message += ", starting with a letter or _"
        return Issue("bad-name", message, path, hint=f"for example '{fixed}'"), True
    if kind == "string_pattern_mismatch" and path == ("model", "device"):
        devices = ["auto", "cpu", "mps", "cuda"]
        hint = "did you mean 'cuda'?" if str(value).lower() in ("gpu", "nvidia") else None
        hint = hint or did_you_mean(str(value), devices, n=1)
        message = f"expected 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N', got {shown}"
        return Issue("bad-value", message, path, hint=hint), False
    if kind == "string_pattern_mismatch":
        what = expected() or f"a string matching {ctx.get('pattern')}"
        return Issue("bad-value", f"expected {what}, got {shown}", path), False
    if kind in ("too_short", "string_too_short"):
        least = ctx.get("min_length", 1)
        message = "must not be empty" if least == 1 else f"needs at least {least} items"
        hint = None
        if path == ("invokes",):
            hint = "add an invoke, e.g. clean: {prompt: 'The Eiffel Tower is in'}"
        return Issue("bad-value", message, path, hint=hint), at_key
    if kind in ("too_long", "string_too_long"):
        most = ctx.get("max_length")
        return Issue("bad-value", f"is too long: at most {most} allowed", path), at_key
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("more than", "gt"),
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds:
        words_, key = bounds[kind]
        return Issue("bad-value", f"must be {words_} {ctx.get(key)}, got {shown}", path), False
    if kind in ("value_error", "assertion_error"):
        message = str(err["msg"])
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        code = "missing-key" if message.startswith("missing required key") else "bad-value"
        hint = None
        if " | " in message:  # validators put their hint after a bar
            message, hint = message.split(" | ", 1)
        return Issue(code, message, path, hint=hint), at_key
    message = str(err["msg"])
    message = message[0].lower() + message[1:] if message else message
    return Issue("bad-value", f"invalid value {shown}: {message}", path), False
