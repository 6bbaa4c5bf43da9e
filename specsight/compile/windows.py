"""The columns an op reads and writes at a site (torch-free): some attention heads of a
per-head site (``heads``), chosen neurons or features (``dims``), or the whole width; attention
patterns can only be saved, from eager attention."""

from __future__ import annotations

from typing import Any

from .. import spec as S
from ..sites import Site, head_columns
from .context import Context, SpecPath

__all__ = ["DimsError", "dim_indices", "op_window"]


def _head_indices(ctx: Context, selector: Any, site: Site, path: SpecPath) -> list[int] | None:
    """The heads an op picks (None: all), range-checked against the site's head count."""
    if selector is None or selector == "all":
        return None
    layout = site.heads
    assert layout is not None
    n = layout.n_heads
    picked: list[int] = []
    for value in selector if isinstance(selector, list) else [selector]:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ctx.fail("bad-head", f"a head is an integer, not {value!r}", path)
        if not -n <= value < n:
            gqa = site.canonical in ("k", "v") and n != ctx.info.n_heads
            what = "key/value heads" if gqa else "heads"
            message = f"head {value} is out of range: '{site.name}' has {n} {what}"
            if gqa:
                message += f" (grouped-query attention: {ctx.info.n_heads} query heads share them)"
            hint = f"use 0..{n - 1}"
            if gqa:
                hint += f"; to sweep this site's heads write sweep: {{head: '0:{n}'}}"
            raise ctx.fail("bad-head", message, path, hint)
        if value % n not in picked:
            picked.append(value % n)
    return picked


def op_window(ctx: Context, op: Any, site: Site, path: SpecPath) -> dict[str, Any]:
    """Columns, head size and width of what the op touches at ``site``."""
    if op.dims is not None:
        return _dims_window(ctx, op, site, path)
    if site.heads is None:
        if op.heads is not None:
            raise ctx.fail(
                "not-a-head-site",
                f"site '{site.name}' has no heads; 'heads' applies to per-head sites "
                "(head_z, q, k, v, attn_pattern)",
                path + ("heads",),
                "remove 'heads', or use a head site such as 'head_z.5'",
            )
        return {"cols": None, "head_dim": None, "width": site.width, "heads": None}
    if site.io == "pattern":
        _check_pattern(ctx, op, site, path)
    heads = _head_indices(ctx, op.heads, site, path + ("heads",))
    chosen = list(range(site.heads.n_heads)) if heads is None else heads
    if site.io == "pattern":
        return {"cols": head_columns(site, heads), "head_dim": None, "width": None, "heads": chosen}
    return {
        "cols": head_columns(site, heads),
        "head_dim": site.heads.d_head,
        "width": len(chosen) * site.heads.d_head,
        "heads": chosen,
    }


class DimsError(ValueError):
    """A ``dims`` selector that does not fit the site."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message, self.hint = message, hint


def dim_indices(dims: Any, width: int | None, site: str) -> list[int]:
    """The sorted columns a ``dims`` selector (an index, 'a:b', or a list) picks; checked
    against the site's width when it is known."""
    picked: set[int] = set()
    for value in dims if isinstance(dims, list) else [dims]:
        if isinstance(value, int):
            span = range(value, value + 1)
        else:
            start, _, stop = str(value).partition(":")
            if not stop and width is None:
                raise DimsError(
                    f"'{value}' needs an end: the width of '{site}' is not known",
                    "write 'start:stop'",
                )
            span = range(int(start or 0), int(stop) if stop else (width or 0))
        if not span or (width is not None and span.stop > width):
            raise DimsError(
                f"dims {value!r} is outside '{site}', which has width {width}"
                if span
                else f"dims {value!r} selects nothing",
                f"use dims in 0..{width - 1}" if width else "use 'start:stop' with start < stop",
            )
        picked.update(span)
    return sorted(picked)


def _dims_window(ctx: Context, op: Any, site: Site, path: SpecPath) -> dict[str, Any]:
    """The columns ``dims`` picks, as sorted (start, stop) ranges, range-checked when the
    site's width is known."""
    if op.heads is not None or site.heads is not None:
        raise ctx.fail(
            "dims-heads",
            f"'dims' picks columns of a site without heads; '{site.name}' is "
            + ("a head site" if site.heads is not None else "given 'heads' too"),
            path + ("dims",),
            "select heads with 'heads', or use a site such as mlp_post.L or resid_post.L",
        )
    try:
        ordered = dim_indices(op.dims, site.width, site.name)
    except DimsError as exc:
        raise ctx.fail("bad-dims", exc.message, path + ("dims",), exc.hint) from None
    ranges: list[tuple[int, int]] = []
    for d in ordered:
        if ranges and ranges[-1][1] == d:
            ranges[-1] = (ranges[-1][0], d + 1)
        else:
            ranges.append((d, d + 1))
    return {
        "cols": tuple(ranges),
        "head_dim": None,
        "width": len(ordered),
        "heads": None,
        "dims": ordered,
    }


def _check_pattern(ctx: Context, op: Any, site: Site, path: SpecPath) -> None:
    if not isinstance(op, S.SaveOp):
        raise ctx.fail(
            "pattern-save-only",
            f"'{site.name}' can only be saved: the module returns its attention weights after "
            "using them, so changing them changes nothing",
            path + ("op",),
            "to change attention, act on q, k, v or head_z of that layer",
        )
    impl = ctx.spec.model.attn_implementation or ctx.info.attn_implementation
    if impl != "eager":
        why = f"{impl} attention does not" if impl else "only eager attention does"
        raise ctx.fail(
            "needs-eager",
            f"'{site.name}' needs the attention weights, and {why} return them",
            path + ("site",),
            "set model: {id: ..., attn_implementation: eager}",
        )
