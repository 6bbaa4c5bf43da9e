"""The cells of a metric worth reading first ("strongest cells"): furthest from the baseline, or
by the effect, and what the summary says of each (value, stderr, interval); a recovery's cells
where the patch restores the clean value exactly are named apart, not ranked, since the patched
site there carries the whole answer (a last layer's residual at the read position)."""

from __future__ import annotations

from typing import Any

from .labels import cell_label, coords

__all__ = ["fmt_value", "spread_text", "strongest_cells", "complete_cells"]


def fmt_value(value: float, digits: int = 3, tiny: bool = True) -> str:
    """Signed, ``digits`` decimals; a large value, and (``tiny``) one that would print as 0.000
    but is not 0, in scientific notation (3 significant digits)."""
    if value != value:  # NaN
        return "nan"
    if tiny and value != 0 and abs(value) < 0.5 * 10**-digits:
        return f"{value:+.2e}"
    return f"{value:+.{digits}f}" if abs(value) < 1000 else f"{value:+.3g}"


def spread_text(extra: dict[str, Any], index: tuple[int, ...]) -> str:
    """`` ± 0.12`` (the standard error) and the bootstrap interval of one cell, when stored."""
    text = ""
    if "stderr" in extra:
        text += f" ± {float(extra['stderr'][index]):.3g}"
    if "ci_low" in extra:
        low, high = float(extra["ci_low"][index]), float(extra["ci_high"][index])
        text += f" [{fmt_value(low)}, {fmt_value(high)}]"
    return text


def strongest_cells(
    name: str, tensor: Any, meta: dict[str, Any], extra: dict[str, Any], n: int = 5
) -> list[str]:
    """The cells furthest from the baseline (0 for a recovery, the baseline metric's value for
    an effect), signed; without a baseline, the largest values."""
    axes = meta.get("axes", [])[: tensor.ndim]
    flat = tensor.float().flatten()
    baseline, effect = meta.get("baseline"), extra.get("effect")
    if effect is not None and tuple(effect.shape) == tuple(tensor.shape):
        effect = effect.float().flatten()
        score = effect.abs().nan_to_num(float("-inf"))
        title = f"  strongest cells of {name} (largest |effect| vs {meta.get('baseline_metric')}):"
    elif baseline is not None:
        effect = None
        score = (flat - baseline).abs().nan_to_num(float("-inf"))
        title = f"  strongest cells of {name} (furthest from {baseline:g}):"
    else:
        effect = None
        score = flat.nan_to_num(float("-inf"))
        title = f"  strongest cells of {name} (largest values; set 'baseline' to rank by effect):"
    lines = [title]
    complete = complete_cells(tensor, meta, extra)
    if complete is not None and bool(complete.any()):
        score = score.masked_fill(complete, float("-inf"))
        shown = [cell_label(meta, axes, coords(i, tuple(tensor.shape))) for i in complete.nonzero().flatten()[:3].tolist()]  # fmt: skip
        more = ", ..." if int(complete.sum()) > len(shown) else ""
        lines.append(
            f"    (not ranked: {int(complete.sum())} cell(s) where the patch restores the clean "
            f"value exactly, recovery 1 on every item, the site carrying the whole answer: "
            f"{'; '.join(shown)}{more})"
        )
        if bool(complete.all()):
            return lines
    order = score.topk(min(n, int((score > float("-inf")).sum()) or 1)).indices.tolist()
    for index in order:
        cell = coords(index, tuple(tensor.shape))
        where = cell_label(meta, axes, cell)
        shown = f"{fmt_value(float(flat[index]))}{spread_text(extra, tuple(cell))}"
        if effect is not None:
            shown += f" (effect {fmt_value(float(effect[index]))})"
        lines.append(f"    {shown}  at {where}")
    return lines


def complete_cells(tensor: Any, meta: dict[str, Any], extra: dict[str, Any]) -> Any:
    """For a recovery: the flat cells where it is 1 on every item (the patched value is the
    clean value: the patch carries the answer itself), within 1e-4 of a ratio; else None."""
    if meta.get("metric_kind") != "recovery":
        return None
    items = extra.get("items")
    if items is not None and tuple(items.shape[:-1]) == tuple(tensor.shape):
        per_cell = items.float().reshape(tensor.numel(), -1)
    else:
        per_cell = tensor.float().reshape(-1, 1)
    return ((per_cell - 1).abs() <= 1e-4).all(dim=1)
