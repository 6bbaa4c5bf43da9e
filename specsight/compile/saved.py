"""Saved values that ``add`` and ``set`` write (torch-free): the store keys a saved name
stands for, a saved value's width against the columns an op writes, and the two saved sets of
a mean difference (a steering vector from contrastive data)."""

from __future__ import annotations

from .. import spec as S
from ..errors import did_you_mean
from ..plan import StoreKey
from ..sites import Site
from .context import Context, SpecPath

__all__ = ["check_saved_width", "mean_diff_keys", "saved_keys"]


def mean_diff_keys(
    ctx: Context,
    source: S.MeanDiffVector,
    site: Site,
    width: int | None,
    common: dict,
    path: SpecPath,
) -> tuple[tuple[StoreKey, ...], tuple[StoreKey, ...]]:
    """The store keys of a mean difference's two saved sets (located issues when a set is
    unknown, of another width, or, per position, of rows with other position counts)."""
    sets = []
    for i, name in enumerate(source.mean_diff):
        where = path + ("mean_diff", i)
        keys = saved_keys(ctx, S.SavedVector(saved=name, reduce="mean"), common, where)
        check_saved_width(ctx, name, site, width, where)
        if source.reduce == "none":
            counts = set(ctx.save_npos[name])
            if len(counts) != 1 or counts.pop() not in (1, len(common["positions"])):
                raise ctx.fail(
                    "position-count",
                    f"saved value '{name}' has {sorted(set(ctx.save_npos[name]))} positions "
                    f"per row but the op selects {len(common['positions'])}",
                    where,
                    "save as many positions in every row (e.g. positions: [-1]), select as "
                    "many, or use reduce: mean",
                )
        sets.append(tuple(keys))
    return sets[0], sets[1]


def check_saved_width(
    ctx: Context, saved: str, site: Site, width: int | None, path: SpecPath
) -> None:
    """A saved value fits the columns an op writes (both widths known before running: canonical
    sites, heads and dims; a raw module's width is checked when the op runs)."""
    widths = ctx.save_widths.get(saved, {None})
    if width is None or None in widths or len(widths) != 1 or width in widths:
        return
    (saved_width,) = widths
    invoke, saved_site = ctx.save_meta[saved]
    raise ctx.fail(
        "vector-size",
        f"saved value '{saved}' ({saved_site} of invoke '{invoke}') has width {saved_width} "
        f"but site '{site.name}' has width {width}",
        path,
        f"save a site of width {width}, or pick {width} columns with heads or dims",
    )


def saved_keys(ctx: Context, source: S.SavedVector, common: dict, path: SpecPath) -> list[str]:
    """The store keys of a saved value an op reads (located issues when it cannot)."""
    keys = ctx.save_keys.get(source.saved, [])
    if not keys:
        saved = sorted(ctx.save_keys)
        listed = ", ".join(saved[:8]) + (", ..." if len(saved) > 8 else "")
        if source.saved not in ctx.save_names:  # a templated name, filled in
            code, message = "unknown-saved", f"no saved value named '{source.saved}'"
            listed = "saved values: " + listed
        else:  # a save of several sites keeps one value per site, under the site's name
            code, message = (
                "saved-sites",
                f"'{source.saved}' saves several sites, each under its own name",
            )
            listed = "name one of: " + listed
        hint = did_you_mean(source.saved, saved, n=3) or listed
        raise ctx.fail(code, message, path, hint)
    if source.reduce == "none" and len(keys) != 1:
        raise ctx.fail(
            "saved-rows",
            f"saved value '{source.saved}' comes from {len(keys)} rows",
            path,
            "add 'reduce: mean' to average it, or save from an invoke with one prompt",
        )
    if source.reduce == "none":
        n_saved = ctx.save_npos[source.saved][0]
        if n_saved not in (1, len(common["positions"])):
            raise ctx.fail(
                "position-count",
                f"saved value '{source.saved}' has {n_saved} positions but the op selects {len(common['positions'])}",
                path,
                "save one position, select as many positions, or add 'reduce: mean'",
            )
    return keys
