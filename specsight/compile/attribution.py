"""Compiling attribution patching (torch-free).

``{kind: attribution, clean, corrupt, site, target, foil}`` estimates, for every site and
position, the effect of patching the clean activation into the corrupted run as
``grad . (clean - corrupt)``, where ``grad`` is the gradient of the corrupted run's logit
difference (target - foil) at that site. The plan keeps the clean values (a save on the clean
row), the corrupted values and gradients (a save and a ``grad`` op on the corrupted row), and
runs a backward pass from the corrupted row's logit difference.
"""

from __future__ import annotations

from typing import Any

from ..errors import did_you_mean, format_path
from ..plan import PlanMetric, RowOp
from ..sites import SiteError, resolve_site
from .context import Abort, Context, SpecPath, plain
from .positions import PositionError, resolve_position

__all__ = ["compile_attribution"]


def _invoke(ctx: Context, ref: str, path: SpecPath) -> list[int]:
    if ref not in ctx.spec.invokes:
        hint = did_you_mean(ref, ctx.spec.invokes) or "invokes: " + ", ".join(ctx.spec.invokes)
        raise ctx.fail("unknown-invoke", f"no invoke named '{ref}'", path, hint)
    invoke = ctx.spec.invokes[ref]
    if invoke.sweep or invoke.generate is not None or len(ctx.tokens[ref]) != 1:
        raise ctx.fail(
            "bad-attribution",
            f"attribution needs '{ref}' to be one prompt without a sweep or generation",
            path,
            "give the clean and corrupted runs one prompt each",
        )
    return ctx.tokens[ref][0]


def compile_attribution(ctx: Context, name: str, metric: Any, path: SpecPath) -> PlanMetric | None:
    try:
        clean = _invoke(ctx, metric.clean, path + ("clean",))
        corrupt = _invoke(ctx, metric.corrupt, path + ("corrupt",))
        if len(clean) != len(corrupt):
            raise ctx.fail(
                "bad-attribution",
                f"'{metric.clean}' has {len(clean)} tokens but '{metric.corrupt}' has "
                f"{len(corrupt)}; attribution compares them position by position",
                path + ("corrupt",),
                "use prompts of the same token length",
            )
        try:
            sites = resolve_site(metric.site, ctx.info)
        except SiteError as exc:
            raise ctx.fail("unknown-site", exc.message, path + ("site",), exc.hint) from None
        if any(site.heads is not None or site.io == "pattern" for site in sites):
            raise ctx.fail(
                "bad-attribution",
                "attribution works on whole-width sites (resid_*, attn_out, mlp_out, ...)",
                path + ("site",),
                "use e.g. 'resid_post.*'",
            )
        try:
            picked = resolve_position(plain(metric.position), corrupt, ctx.tok)
        except PositionError as exc:
            raise ctx.fail("bad-position", exc.message, path + ("position",), exc.hint) from None
        if len(picked) != 1:
            raise ctx.fail(
                "bad-position", "a metric reads one position", path + ("position",), "use 'last'"
            )
        tokens = (
            ctx.token_id(metric.target, path + ("target",)),
            ctx.token_id(metric.foil, path + ("foil",)),
        )
    except Abort:
        return None
    clean_row = ctx.row_index[(metric.clean, 0, 0)]
    corrupt_row = ctx.row_index[(metric.corrupt, 0, 0)]
    positions = tuple(range(len(corrupt)))
    keys = []
    for site in sites:
        common = dict(
            site=site.name,
            module=site.module,
            io=site.io,
            positions=positions,
            origin=format_path(path),
            layer=site.layer,
        )
        triple = tuple(f"attr/{name}/{role}/{site.name}" for role in ("clean", "corrupt", "grad"))
        ctx.ops.append(RowOp("save", row=clean_row, store=triple[0], **common))
        ctx.ops.append(RowOp("save", row=corrupt_row, store=triple[1], **common))
        ctx.ops.append(RowOp("grad", row=corrupt_row, store=triple[2], **common))
        keys.extend(triple)
    return PlanMetric(
        name=name,
        kind="attribution",
        invoke=metric.corrupt,
        rows=(corrupt_row,),
        positions=(picked[0],),
        tokens=tokens,
        token_strs=tuple(ctx.tok.token_str(t) for t in tokens),
        sites=tuple(site.name for site in sites),
        store_keys=tuple(keys),
        inputs=(metric.clean, metric.corrupt),
    )
