"""Compiling a spec's ``saes:`` (torch-free): each SAE's folder (beside the spec, or a
registered id), its ``cfg.json`` and weight shapes checked, and the site it reads resolved;
the result is the plan's :class:`~specsight.plan.SaeInfo` s and what resolving
``sae.NAME.PART`` sites needs (:class:`~specsight.sites.SaeSites`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import did_you_mean
from ..plan import SaeInfo, SaeRef
from ..sites import SaeSites, Site, SiteError, resolve_site
from .context import Abort, Context, SpecPath

__all__ = [
    "ARCHITECTURES",
    "BUILTIN_SAES",
    "SaeSource",
    "builtin_saes",
    "compile_saes",
    "read_sae_config",
]

#: the SAE architectures we run (SAELens's names); transcoders read one site and stand in for
#: another's value (skip transcoders add ``x @ W_skip.T``)
SAE_ARCHITECTURES = ("standard", "topk", "jumprelu")
TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
ARCHITECTURES = SAE_ARCHITECTURES + TRANSCODERS
#: SAELens's input normalisations: the first three are folded into the weights on saving
NORMALISATIONS = (
    "none",
    "expected_average_only_in",
    "covariance_whitening",
    "constant_norm_rescale",
    "layer_norm",
)
_FOLDED = ("expected_average_only_in", "covariance_whitening")
_WEIGHTS = "sae_weights.safetensors"

_EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "specs" / "data" / "saes"
#: SAEs every local run and every server knows by id: the examples' own
BUILTIN_SAES = {"smollm2-135m-res6": _EXAMPLES / "res6"}


@dataclass(frozen=True)
class SaeSource:
    """A registered SAE: its folder, or (a client compiling for a server) only its config."""

    folder: str | None
    config: Mapping[str, Any] | None = None


def builtin_saes() -> dict[str, SaeSource]:
    """The built-in SAEs whose files are installed."""
    return {
        name: SaeSource(str(folder))
        for name, folder in BUILTIN_SAES.items()
        if (folder / "cfg.json").is_file()
    }


class SaeConfigError(ValueError):
    """A folder that is not a usable SAE, with a hint."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


def _int(cfg: Mapping[str, Any], key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SaeConfigError(f"cfg.json: '{key}' must be a positive integer, not {value!r}")
    return value


def read_sae_config(folder: str | None, cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fields of :class:`SaeInfo` an SAE's ``cfg.json`` gives (and its weights' shapes
    checked against them when the folder is here)."""
    if cfg is None:
        assert folder is not None
        file = os.path.join(folder, "cfg.json")
        if not os.path.isfile(file):
            raise SaeConfigError(
                f"'{folder}' has no cfg.json", "an SAE folder holds cfg.json and " + _WEIGHTS
            )
        try:
            with open(file, encoding="utf-8") as handle:
                cfg = json.load(handle)
        except (OSError, ValueError) as exc:
            raise SaeConfigError(f"cfg.json cannot be read: {exc}") from None
    if not isinstance(cfg, Mapping):
        raise SaeConfigError("cfg.json must hold a JSON object")
    architecture = cfg.get("architecture", "standard")
    if architecture not in ARCHITECTURES:
        raise SaeConfigError(
            f"cfg.json: architecture {architecture!r} is not supported",
            "supported: " + ", ".join(ARCHITECTURES),
        )
    normalize = cfg.get("normalize_activations") or "none"
    if normalize not in NORMALISATIONS:
        raise SaeConfigError(
            f"cfg.json: normalize_activations {normalize!r} is not supported",
            "supported: " + ", ".join(NORMALISATIONS),
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise SaeConfigError(
            "cfg.json: rescale_acts_by_decoder_norm is not supported",
            "fold the decoder norms into W_enc and W_dec first",
        )
    transcoder = architecture in TRANSCODERS
    if transcoder and normalize not in ("none", *_FOLDED):
        raise SaeConfigError(f"cfg.json: a transcoder with normalize_activations {normalize!r}")
    fields = dict(
        architecture=architecture,
        d_in=_int(cfg, "d_in"),
        d_sae=_int(cfg, "d_sae"),
        d_out=_int(cfg, "d_out") if transcoder else None,
        k=_int({"k": 100, **cfg}, "k") if architecture == "topk" else None,
        apply_b_dec_to_input=not transcoder and bool(cfg.get("apply_b_dec_to_input", True)),
        normalize_activations="none" if normalize in _FOLDED else normalize,
    )
    if folder is not None and cfg is not None:
        _check_weights(folder, fields)
    return fields


def _check_weights(folder: str, fields: dict[str, Any]) -> None:
    """The weight file's tensors have the shapes the config says (read from its header)."""
    file = os.path.join(folder, _WEIGHTS)
    if not os.path.isfile(file):
        raise SaeConfigError(
            f"'{folder}' has no {_WEIGHTS}", "an SAE folder holds cfg.json and " + _WEIGHTS
        )
    from safetensors import safe_open

    d_in, d_sae, architecture = fields["d_in"], fields["d_sae"], fields["architecture"]
    d_out = fields["d_out"] or d_in
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,)}
    if architecture.startswith("jumprelu"):
        want["threshold"] = (d_sae,)
    if "skip" in architecture:
        want["W_skip"] = (d_out, d_in)
    try:
        with safe_open(file, framework="numpy") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # a damaged or foreign file
        raise SaeConfigError(f"{_WEIGHTS} cannot be read: {exc}") from None
    for key, shape in want.items():
        if key not in shapes:
            raise SaeConfigError(
                f"{_WEIGHTS} has no tensor '{key}'", "tensors: " + ", ".join(sorted(shapes))
            )
        if shapes[key] != shape:
            raise SaeConfigError(
                f"{_WEIGHTS}: '{key}' has shape {list(shapes[key])}, but cfg.json (d_in "
                f"{d_in}, d_sae {d_sae}, d_out {d_out}) says {list(shape)}"
            )


def _folder(
    ctx: Context, name: str, entry: Any, path: SpecPath, catalog: Mapping[str, SaeSource]
) -> SaeSource:
    if entry.path is not None:
        if not ctx.allow_files:
            raise ctx.fail(
                "file-not-allowed",
                f"SAE '{name}' names a folder: a server never reads paths from a spec",
                path + ("path",),
                "name an SAE the server has with 'id:' ("
                + (", ".join(catalog) or "it has none")
                + ")",
            )
        full = os.path.normpath(os.path.join(ctx.doc.base_dir or os.getcwd(), entry.path))
        if not os.path.isdir(full):
            raise ctx.fail("file-not-found", f"SAE folder '{entry.path}' not found", path + ("path",),
                           "the path is relative to the spec's folder")  # fmt: skip
        return SaeSource(full)
    if entry.id not in catalog:
        known = ", ".join(sorted(catalog)) or "none"
        raise ctx.fail(
            "unknown-sae",
            f"no SAE registered as '{entry.id}' (registered: {known})",
            path + ("id",),
            did_you_mean(entry.id, list(catalog))
            or "register one with `--sae ID=FOLDER`, or give 'path:' (a folder beside the spec)",
        )
    return catalog[entry.id]


def _site(ctx: Context, text: str, path: SpecPath, width: int, what: str) -> Site:
    try:
        sites = resolve_site(text, ctx.info)
    except SiteError as exc:
        raise ctx.fail("unknown-site", exc.message, path, exc.hint) from None
    if len(sites) != 1 or sites[0].heads is not None or sites[0].io == "pattern":
        raise ctx.fail("bad-sae-site", f"an SAE {what} one site of hidden states; '{text}' is "
                       + (f"{len(sites)} sites" if len(sites) != 1 else "a per-head site"), path,
                       "name one layer's site, e.g. resid_post.6")  # fmt: skip
    site = sites[0]
    if site.width is not None and site.width != width:
        side = "d_in" if what == "reads" else "d_out"
        raise ctx.fail(
            "sae-width",
            f"the SAE's {side} is {width} but '{text}' has width {site.width}",
            path,
            "use the site the SAE was trained on",
        )
    return site


def compile_saes(ctx: Context, catalog: Mapping[str, SaeSource]) -> None:
    """Every SAE of the spec into ``ctx.saes`` (the plan's) and ``ctx.sae_sites``."""
    for name, entry in ctx.spec.saes.items():
        try:
            _compile_sae(ctx, name, entry, catalog)
        except Abort:  # recorded; the other SAEs are still checked
            continue


def _compile_sae(ctx: Context, name: str, entry: Any, catalog: Mapping[str, SaeSource]) -> None:
    path: SpecPath = ("saes", name)
    source = _folder(ctx, name, entry, path, catalog)
    try:
        fields = read_sae_config(source.folder, source.config)
    except SaeConfigError as exc:
        where = path + (("path",) if entry.path is not None else ("id",))
        raise ctx.fail("bad-sae", f"SAE '{name}': {exc.message}", where, exc.hint) from None
    site = _site(ctx, entry.site, path + ("site",), fields["d_in"], "reads")
    site_out = _site_out(ctx, name, entry, fields, path)
    out: dict[str, Any] = {}
    if site_out is not None:
        out = dict(out_site=site_out.name, out_module=site_out.module, out_io=site_out.io)
    ctx.saes[SaeRef(name)] = SaeInfo(
        folder=source.folder or "",
        id=entry.id,
        site=site.name,
        module=site.module,
        io=site.io,
        layer=site.layer,
        keep_error=entry.keep_error,
        **fields,
        **out,
    )
    ctx.sae_sites[name] = SaeSites(site, fields["d_sae"], site_out)


def _site_out(
    ctx: Context, name: str, entry: Any, fields: dict[str, Any], path: SpecPath
) -> Site | None:
    """A transcoder's ``site_out`` (a module's output of width d_out); None for an SAE."""
    if (entry.site_out is None) != (fields["d_out"] is None):
        has = entry.site_out is not None
        raise ctx.fail(
            "transcoder",
            f"SAE '{name}' is a {fields['architecture']}: "
            + ("it writes back the site it reads" if has else "it needs a site_out"),
            path + ("site_out",) if has else path,
            "remove site_out" if has else "add site_out: the site it stands in for",
        )
    if entry.site_out is None:
        return None
    site_out = _site(ctx, entry.site_out, path + ("site_out",), fields["d_out"], "writes")
    if site_out.io != "output":
        raise ctx.fail(
            "transcoder",
            f"a transcoder stands in for a module's output; '{entry.site_out}' is an input",
            path + ("site_out",),
            "name a module's output, e.g. mlp_out.6",
        )
    return site_out
