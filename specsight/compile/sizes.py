"""What a spec asks of a model, computed from the spec before compiling it (torch-free): sweep
cells, batch rows, prompt tokens, new tokens, and the exact bytes of every result tensor.

A server checks these against its limits before any work proportional to them (compiling
materialises every row, op and per-step store key). The sizes follow the engine's shapes: a
saved value is stacked over the sweep, prompt and step axes and padded to the longest row
(float32); metrics and token ids have their own widths; generation adds the new ids (int64).
Raw module paths take their widths from ``module_widths`` (measured on the real model).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

from .. import spec as S
from ..models import ModelInfo, Tokenizer
from ..sites import SaeSites, Site, SiteError, resolve_site
from ..spec import document_of
from .context import SpecContext, default_save_name, plain
from .dataset import invoke_prompts, render_selector, render_value, use_dataset
from .generation import reaches_new_token, step_count
from .positions import PositionError, resolve_positions
from .result_size import header_bytes, manifest_bytes
from .sweep import MAX_CELLS, Grid, GridError, count_cells, expand_grid, substitute
from .windows import DimsError, dim_indices

__all__ = ["SpecSizes", "spec_sizes"]

_FLOAT, _INT = 4, 8


@dataclass
class SpecSizes:
    """The sizes of a spec's run; ``tensors`` maps each result tensor's name to its bytes."""

    cells: int = 0
    rows: int = 0
    longest_prompt: int = 0
    total_tokens: int = 0
    max_new_tokens: int = 0
    tensors: dict[str, int] = field(default_factory=dict)
    #: the safetensors header and manifest.json (upper estimates, see result_size)
    header: int = 0
    manifest: int = 0

    @property
    def result_bytes(self) -> int:
        """Everything a run stores: the tensors, their header, the manifest."""
        return sum(self.tensors.values()) + self.header + self.manifest


@dataclass
class _Invoke:
    tokens: list[list[int]]
    grid: Grid
    lead: tuple[int, ...]  # result axes before a value's own: sweep cells, then prompts
    axes: tuple[str, ...]  # the names of ``lead``
    cells: list[dict[str, Any]]
    #: an invoke over the dataset: its rows, whose values fill position templates
    items: tuple[dict[str, Any], ...] | None = None


def spec_sizes(
    spec: S.Spec,
    info: ModelInfo,
    tokenizer: Tokenizer,
    *,
    module_widths: dict[tuple[str, str], int] | None = None,
    max_cells: int = MAX_CELLS,
    sae_widths: dict[str, int] | None = None,
) -> SpecSizes:
    """The sizes of ``spec`` on this model (text inputs). Problems compiling would report
    (an unknown site, a bad position) are skipped here: they add nothing. Over ``max_cells``
    cells only the counts are filled in (nothing is expanded). ``sae_widths``: the feature
    counts of the SAEs specs may name by id (``sae.NAME.features`` sites' widths)."""
    sizes = SpecSizes()
    ctx = SpecContext(spec=spec, doc=document_of(spec))
    use_dataset(ctx, allow_files=False)  # a server's spec has its rows inline
    prompts = {name: invoke_prompts(ctx, name, inv) for name, inv in spec.invokes.items()}
    tokens = {name: [tokenizer.encode(p) for p in texts] for name, texts in prompts.items()}
    owners = _count(sizes, spec, info, tokens)
    if sizes.cells > max_cells:
        return sizes
    invokes: dict[str, _Invoke] = {}
    known = _Known(module_widths or {}, _sae_sites(spec, info, sae_widths or {}))
    for name, invoke in spec.invokes.items():
        lengths = {len(t) for t in tokens[name]}
        try:
            grid = expand_grid(
                invoke.sweep,
                info.n_layers,
                lengths.pop() if len(lengths) == 1 else None,
                n_heads=info.n_heads,
                zipped=invoke.sweep_mode == "zip",
                max_cells=max_cells,
            )
        except GridError:
            grid = Grid((), ())
        cells = grid.cells() if grid.axes else [{}]
        lead = tuple(grid.shape) + ((len(tokens[name]),) if ctx.input_axis(name) else ())
        items = ctx.items.rows if name in ctx.item_invokes and ctx.items else None
        each = ctx.input_axis(name)
        names = tuple(grid.axes) + ((each,) if each else ())
        invokes[name] = _Invoke(tokens[name], grid, lead, names, cells, items)
        for op in invoke.ops:
            if isinstance(op, S.SaveOp):
                _save_sizes(sizes, info, tokenizer, name, invoke, invokes[name], op, known)
        owners.update(dict.fromkeys(sizes.tensors.keys() - owners.keys(), name))
    for name, metric in spec.metrics.items():
        _metric_sizes(sizes, spec, info, invokes, name, metric)
        owner = getattr(metric, "invoke", None) or getattr(metric, "corrupt", None) or ""
        owners.update(dict.fromkeys(sizes.tensors.keys() - owners.keys(), owner))
    sizes.header = header_bytes(sizes.tensors)
    axis_sizes = {name: shape.lead for name, shape in invokes.items()}
    sizes.manifest = manifest_bytes(spec, owners, axis_sizes, prompts)
    return sizes


def _count(
    sizes: SpecSizes, spec: S.Spec, info: ModelInfo, tokens: dict[str, list[list[int]]]
) -> dict[str, str]:
    """Cells, rows and tokens of every invoke, counted without expanding a sweep (the limit on
    cells comes first), and the generated ids; returns those tensors' invokes."""
    owners: dict[str, str] = {}
    for name, invoke in spec.invokes.items():  # counted first: a sweep is expanded only within
        longest = max(map(len, tokens[name]), default=0)  # the limit on cells
        axes = {"layer": info.n_layers, "head": info.n_heads, "pos": longest}
        cells = count_cells(invoke.sweep, axes, invoke.sweep_mode == "zip")
        sizes.cells += cells
        sizes.rows += cells * len(tokens[name])
        sizes.longest_prompt = max(sizes.longest_prompt, longest)
        sizes.total_tokens += cells * sum(map(len, tokens[name]))
        if invoke.generate is not None:
            new = invoke.generate.max_new_tokens
            sizes.max_new_tokens = max(sizes.max_new_tokens, new)
            sizes.tensors[f"{name}/generated_ids"] = cells * len(tokens[name]) * new * _INT
            owners[f"{name}/generated_ids"] = name
    return owners


@dataclass(frozen=True)
class _Known:
    """What sizes sites besides the model's info: measured module widths, the spec's SAEs."""

    widths: dict[tuple[str, str], int]
    saes: dict[str, SaeSites]


def _sae_sites(spec: S.Spec, info: ModelInfo, sae_widths: dict[str, int]) -> dict[str, SaeSites]:
    """The spec's SAEs named by a known id, as site resolution needs them (a transcoder's
    recon and error at the site it stands in for)."""
    out = {}
    for name, entry in spec.saes.items():
        if entry.id in sae_widths:
            with contextlib.suppress(SiteError, ValueError):
                (base,) = resolve_site(entry.site, info)
                (site_out,) = resolve_site(entry.site_out, info) if entry.site_out else (None,)
                out[name] = SaeSites(base, sae_widths[entry.id], site_out)
    return out


def _sites(
    text: str,
    info: ModelInfo,
    cache: dict[str, list[Site]],
    saes: dict[str, SaeSites] | None = None,
) -> list[Site]:
    if text not in cache:
        try:
            cache[text] = resolve_site(text, info, saes)
        except SiteError:
            cache[text] = []
    return cache[text]


def _count_heads(selector: Any, site: Site) -> int:
    if selector is None or selector == "all":
        return site.heads.n_heads if site.heads else 0
    return len(selector) if isinstance(selector, list) else 1


def _width(site: Site, info: ModelInfo, widths: dict[tuple[str, str], int]) -> int:
    if site.width is not None and site.canonical is not None:
        return site.width
    return widths.get((site.module, site.io), site.width or info.d_model)


def _save_sizes(
    sizes: SpecSizes,
    info: ModelInfo,
    tokenizer: Tokenizer,
    invoke_name: str,
    invoke: S.Invoke,
    shape: _Invoke,
    op: S.SaveOp,
    known: _Known,
) -> None:
    """One save op: a tensor per concrete site, padded to its longest row."""
    raw = op.model_dump(by_alias=True)
    cache: dict[str, list[Site]] = {}
    longest: dict[str, list[int]] = {}  # site name -> [positions, keys]
    sites_of: dict[str, Site] = {}
    heads: dict[str, int] = {}
    for variables in shape.cells:
        concrete = substitute(raw, variables) if variables else raw
        for site in _sites(str(concrete["site"]), info, cache, known.saes):
            sites_of.setdefault(site.name, site)
            heads[site.name] = _count_heads(concrete.get("heads"), site)
            for index, tokens in enumerate(shape.tokens):
                selector = plain(concrete["positions"])
                if shape.items is not None:
                    selector = render_selector(selector, shape.items[index])
                try:
                    selected = resolve_positions(selector, tokens, tokenizer)
                except PositionError:
                    selected = []
                count = len(selected)
                best = longest.setdefault(site.name, [0, 0])
                best[0], best[1] = max(best[0], count), max(best[1], len(tokens))
    steps = ()
    if invoke.generate is not None:
        n = step_count(op.steps, invoke.generate.max_new_tokens)
        steps = (n,) if reaches_new_token(op.positions) else (1,)
    several = len(sites_of) > 1 and len(shape.cells) == 1
    for site_name, site in sites_of.items():
        positions, keys = longest[site_name]
        if steps and steps[0] > 1:
            positions = max(positions, 1)
        if site.io == "pattern":
            value = (positions, heads[site_name], keys)
        elif site.heads is not None:
            value = (positions, heads[site_name], site.heads.d_head)
        else:
            value = (positions, _width(site, info, known.widths))
            if raw.get("dims") is not None:
                with contextlib.suppress(DimsError):
                    value = (positions, len(dim_indices(raw["dims"], value[1], site_name)))
        if several:
            name = default_save_name(invoke_name, site_name, op.grad)
        else:
            name = op.name or default_save_name(invoke_name, op.site, op.grad)
        sizes.tensors[name] = math.prod(shape.lead + steps + value) * _FLOAT


def _metric_sizes(
    sizes: SpecSizes,
    spec: S.Spec,
    info: ModelInfo,
    invokes: dict[str, _Invoke],
    name: str,
    metric: Any,
) -> None:
    if isinstance(metric, S.ProbeMetric):  # per site, over the items
        _probe_sizes(sizes, info, invokes.get(metric.invoke), name, metric)
        return
    if isinstance(metric, S.EdgeAttributionMetric | S.FaithfulnessMetric):  # fixed shapes
        clean = invokes.get(metric.clean)
        per_pos = len(clean.tokens[0]) if clean and clean.tokens else 1
        per_pos = per_pos if getattr(metric, "positions", "summed") == "per_token" else 1
        counts = metric.value_counts(1, metric.suffix_size(info, 0) * per_pos)
        for key, (count, _ids) in counts.items():
            sizes.tensors[name + (f"/{key}" if key else "")] = count * _FLOAT
        return
    if metric.fixed_axes is not None:  # attribution: [site, pos] of the corrupted prompt
        corrupt = invokes.get(metric.corrupt)
        n_pos = len(corrupt.tokens[0]) if corrupt and corrupt.tokens else 0
        n_sites = len(_sites(metric.site, info, {}))
        sizes.tensors[name] = n_sites * n_pos * _FLOAT
        return
    owner = metric
    if metric.shaped_like is not None:  # a recovery: one value per cell of the patched metric
        owner = spec.metrics.get(metric.shaped_like)
        if owner is None or not owner.scalar:
            return
    shape = invokes.get(owner.invoke)
    if shape is None:
        return
    cells = math.prod(shape.lead)
    if owner is not metric:
        cells = owner.value_counts(cells, 0)[""][0]
    n_sites = len(_sites(metric.site, info, {})) if "site" in metric.value_axes() else 0
    n_sites = metric.suffix_size(info, n_sites)
    counts = metric.value_counts(cells, n_sites) if owner is metric else {"": (cells, False)}
    for suffix, (count, ids) in counts.items():
        sizes.tensors[f"{name}/{suffix}" if suffix else name] = count * (_INT if ids else _FLOAT)
    _reduce_sizes(sizes, name, metric, shape)
    if getattr(metric, "baseline", None) is not None:
        sizes.tensors[f"{name}/effect"] = sizes.tensors[name]


def _probe_sizes(
    sizes: SpecSizes, info: ModelInfo, shape: _Invoke | None, name: str, metric: Any
) -> None:
    """A probe's accuracy, AUROC and training accuracy per site, its weights [site, outputs,
    width] and bias, and which items were held out."""
    if shape is None or shape.items is None:
        return
    sites = _sites(metric.site, info, {})
    classes = {str(render_value(metric.label, row)) for row in shape.items}
    outputs = 1 if len(classes) <= 2 else len(classes)
    for key in ("", "/auroc", "/train_accuracy"):
        sizes.tensors[name + key] = len(sites) * _FLOAT
    width = sum(_width(site, info, {}) for site in sites)
    sizes.tensors[f"{name}/weight"] = outputs * width * _FLOAT
    sizes.tensors[f"{name}/bias"] = len(sites) * outputs * _FLOAT
    sizes.tensors[f"{name}/held_out"] = len(shape.items) * _FLOAT


def _reduce_sizes(sizes: SpecSizes, name: str, metric: Any, shape: _Invoke) -> None:
    """A reduced metric: the per-item values stay (``/items``); the statistic, its standard
    error and interval are one item's size."""
    reduce = getattr(metric, "reduce", None)
    default = metric.reduced_by_default and shape.axes[-1:] in (("item",), ("prompt",))
    if reduce is None and getattr(metric, "of", None) != "means" and not default:
        return
    full = sizes.tensors.get(name, 0)
    n = shape.lead[-1] if shape.lead else 1  # the input axis, the usual one to reduce
    if reduce is not None and reduce.over in shape.axes:
        n = shape.lead[shape.axes.index(reduce.over)]
    one = full // max(n, 1)
    sizes.tensors[f"{name}/items"] = full
    sizes.tensors[name] = one
    sizes.tensors[f"{name}/stderr"] = one
    for companion in metric.reduced_companions:
        sizes.tensors[f"{name}/{companion}/items"] = sizes.tensors[f"{name}/{companion}"]
        sizes.tensors[f"{name}/{companion}"] //= max(n, 1)
    if reduce is not None and reduce.ci:
        sizes.tensors[f"{name}/ci_low"] = sizes.tensors[f"{name}/ci_high"] = one
