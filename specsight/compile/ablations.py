"""Compiling the ablation family (torch-free): mean_ablate, resample_ablate, noise, project_out,
clamp and skip become plan ops (:mod:`specsight.plan.ops`).

* ``mean_ablate`` -> ``mean``: the captures of every row of the reference invoke, averaged per
  position (``over: position``) or over positions too (``over: all``);
* ``resample_ablate`` -> ``patch`` from item pi(i) of the source, pi a seeded derangement;
* ``noise`` -> ``noise``: a seed per item, ``factor`` the std (or, with ``sources``, the multiple
  of the reference rows' empirical std);
* ``project_out`` -> ``project_out`` over plan vectors (the basis is made at run time);
* ``clamp`` -> ``set`` with a constant vector over the chosen dims;
* ``skip`` -> a capture of the layer's input in the same row and a ``patch`` of its output.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from .. import spec as S
from ..plan import RowRef, StoreKey, VectorKey, site_fields
from ..plan.ops import Capture, Mean, Noise, Patch, ProjectOut, SetVector
from ..sites import Site, SiteError, resolve_site
from .context import Context, SpecPath
from .inputs import read_array_file

__all__ = ["ABLATION_COMPILERS", "capture_key", "derangement", "noise_seed", "vector_key"]


def _capture_whole(
    ctx: Context, key: StoreKey, row: int, site: Site, origin: str, layer: int | None
) -> None:
    """Keep every position of ``row`` at ``site`` under store key ``key``."""
    ctx.captures[key] = Capture(
        **{**site_fields(site), "layer": layer},
        row=RowRef(row),
        positions=tuple(range(len(ctx.rows[row].tokens))),
        store=key,
        origin=origin,
    )


def capture_key(ctx: Context, source: str, prompt: int, site: Site, origin: str) -> StoreKey:
    """The store key of a source row's whole sequence at ``site``, captured once for every op
    that reads it."""
    part = "" if site.sae is None else f"/sae.{site.sae}.{site.part}"
    key = StoreKey(f"capture/{source}/{prompt}/{site.module}/{site.io}{part}")
    if key not in ctx.captures:
        _capture_whole(ctx, key, ctx.row_index[(source, 0, prompt)], site, origin, site.layer)
    return key


def vector_key(ctx: Context, values: tuple[float, ...]) -> VectorKey:
    """Register a vector in the plan under a key derived from its values."""
    key = VectorKey("v" + hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16])
    ctx.vectors[key] = values
    return key


def noise_seed(seed: int, item: int) -> int:
    """The seed of one item's (or prompt's) noise draw: the same item gets the same noise in
    every sweep cell, every block and every invoke with this seed."""
    return (int(seed) * 1_000_003 + item) % 2**63


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) that moves every index (Sattolo's shuffle: one cycle)."""
    order = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    return order


def _clamp(ctx: Context, op: S.ClampOp, at: Any, **_: Any) -> None:
    if op.dims is None:
        raise ctx.fail(
            "clamp-dims",
            "clamp sets chosen dims to a value: say which",
            at.path + ("op",),
            "add dims: [index, ...] or dims: 'start:stop'",
        )
    n = sum(stop - start for start, stop in at.common["cols"])
    ctx.ops.append(SetVector(**at.common, vector=vector_key(ctx, (float(op.value),) * n)))


def _unswept(ctx: Context, source: str, op: Any, path: SpecPath, field: str) -> None:
    if ctx.grids[source].axes:
        raise ctx.fail(
            "patch-from-sweep",
            f"cannot {op.op} from '{source}': it is swept, so it has no single value per site",
            path + (field,),
            f"{op.op} from an invoke without a sweep",
        )


def _mean(ctx: Context, op: S.MeanAblateOp, at: Any, **_: Any) -> None:
    site, common, path = at.site, at.common, at.path
    source = op.from_
    _unswept(ctx, source, op, path, "from")
    prompts = ctx.tokens[source]
    keys = tuple(capture_key(ctx, source, i, site, common["origin"]) for i in range(len(prompts)))
    longest = max(len(t) for t in prompts)
    if op.over == "items" and max(common["positions"]) >= longest:
        raise ctx.fail(
            "bad-position",
            f"position {max(common['positions'])} has no mean: the rows of '{source}' have at "
            f"most {longest} tokens",
            path + ("positions",),
            "use over: positions (one mean over every position), or longer reference prompts",
        )
    over = "position" if op.over == "items" else "all"
    ctx.ops.append(Mean(**common, sources=keys, over=over))


def _noise(ctx: Context, op: S.NoiseOp, at: Any, **_: Any) -> None:
    site, common, path = at.site, at.common, at.path
    # item numbers of the whole dataset: the same item gets the same noise in every block
    in_whole = ctx.items.offset if ctx.items and at.invoke in ctx.item_invokes else 0
    prompt_index = at.prompt_index + in_whole
    if (op.std is None) == (op.std_of is None):
        raise ctx.fail(
            "noise-scale",
            "give the noise's size: 'std' (absolute), or 'std_of' an invoke (and 'scale', a "
            "multiple of the site's standard deviation over its rows)",
            path + ("op",),
            "e.g. {op: noise, site: embed, positions: ..., std_of: clean, scale: 3}",
        )
    sources: tuple[StoreKey, ...] = ()
    std = float(op.std) if op.std is not None else float(op.scale)
    if op.std_of is not None:
        _unswept(ctx, op.std_of, op, path, "std_of")
        n = len(ctx.tokens[op.std_of])
        sources = tuple(capture_key(ctx, op.std_of, i, site, common["origin"]) for i in range(n))
    seed = noise_seed(int(op.seed), prompt_index)
    ctx.ops.append(Noise(**common, std=std, sources=sources, seed=seed))


def _project_out(ctx: Context, op: S.ProjectOutOp, at: Any, **_: Any) -> None:
    site, path, width = at.site, at.path, at.window["width"]
    where = path + ("vectors",)
    if isinstance(op.vectors, S.FileVector):
        array = read_array_file(ctx, op.vectors, where, "vectors")
        if array.ndim not in (1, 2):
            raise ctx.fail(
                "vector-shape",
                f"vectors in '{op.vectors.file}' have shape {list(array.shape)}; expected "
                "[k, width] (or one vector)",
                where + ("file",),
            )
        rows = array.reshape(-1, array.shape[-1]).astype("float64").tolist()
    else:
        rows = op.vectors
    lengths = {len(row) for row in rows}
    if len(lengths) != 1 or (width is not None and lengths != {width}):
        shown = ", ".join(str(n) for n in sorted(lengths))
        raise ctx.fail(
            "vector-size",
            f"the vectors have {shown} values but site '{site.name}' has width {width}",
            where,
            f"give vectors of {width} values" if width else "give vectors of equal length",
        )
    if not any(v for row in rows for v in row):
        raise ctx.fail("zero-vectors", "the vectors to project out are all zero", where)
    keys = tuple(vector_key(ctx, tuple(float(v) for v in row)) for row in rows)
    ctx.ops.append(ProjectOut(**at.common, vectors=keys))


def _skip(ctx: Context, op: S.SkipOp, at: Any, **_: Any) -> None:
    site, common, path = at.site, at.common, at.path
    if site.canonical != "resid_post" or site.layer is None:
        raise ctx.fail(
            "skip-site",
            f"skip sets a layer's output to its input; '{site.name}' is not a layer's output",
            path + ("site",),
            "use site: resid_post.L (the output of layer L)",
        )
    try:
        (inputs,) = resolve_site(f"resid_pre.{site.layer}", ctx.info)
    except (SiteError, ValueError):
        raise ctx.fail(
            "skip-site", f"layer {site.layer}'s input is not known", path + ("site",)
        ) from None
    row = common["row"]
    key = StoreKey(f"skip/{row}/{site.layer}")
    _capture_whole(ctx, key, row, inputs, common["origin"], site.layer)
    ctx.ops.append(Patch(**common, source=key, source_positions=common["positions"]))


#: the ablation family's compilers, by spec op class (see ``ops._COMPILERS``)
ABLATION_COMPILERS: dict[type, Any] = {
    S.MeanAblateOp: _mean,
    S.NoiseOp: _noise,
    S.ProjectOutOp: _project_out,
    S.ClampOp: _clamp,
    S.SkipOp: _skip,
}
