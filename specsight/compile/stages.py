"""Ordering invokes into stages (torch-free): every invoke runs after the invokes it reads
from (patch sources, saved values), so each value exists before a row needs it. Save names are
collected first (duplicates refused); missing and circular references are located errors.
"""

from __future__ import annotations

import re

from .. import spec as S
from ..errors import did_you_mean, format_path
from .context import SpecContext, SpecPath, default_save_name
from .distributions import kl_dependencies
from .paths import path_base

__all__ = ["collect_save_names", "order_stages"]


def _sources_of(invoke: S.Invoke) -> list[tuple[int, str, str, tuple[str | int, ...]]]:
    """(op index, kind, name, path in the op) for every reference an invoke's ops make: patch
    and ablation sources, noise scales, saved values (a mean difference reads two)."""
    refs: list[tuple[int, str, str, tuple[str | int, ...]]] = []
    for i, op in enumerate(invoke.ops):
        for field_name, source in S.invoke_sources(op):
            refs.append((i, "invoke", source, (field_name,)))
        for attr in ("vector", "value"):
            source = getattr(op, attr, None)
            if isinstance(source, S.SavedVector):
                refs.append((i, "saved", source.saved, (attr, "saved")))
            elif isinstance(source, S.MeanDiffVector):
                refs += [
                    (i, "saved", n, (attr, "mean_diff", j)) for j, n in enumerate(source.mean_diff)
                ]
    return refs


def collect_save_names(ctx: SpecContext) -> None:
    for name, invoke in ctx.spec.invokes.items():
        for i, op in enumerate(invoke.ops):
            if isinstance(op, S.SaveOp):
                save_name = op.name or default_save_name(name, op.site, op.grad)
                if save_name in ctx.save_names:
                    ctx.fail(
                        "duplicate-save",
                        f"two saves are named '{save_name}'",
                        ("invokes", name, "ops", i, "name" if op.name else "site"),
                        "the first is at {}; give one of them a different 'name'".format(
                            format_path(
                                (
                                    "invokes",
                                    *ctx.save_names[save_name][:1],
                                    "ops",
                                    ctx.save_names[save_name][1],
                                )
                            )
                        ),
                    )
                    continue
                ctx.save_names[save_name] = (name, i)


_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_SITE_INDEX = re.compile(r"(?<=\.)(\*|\d+(:\d*)?|:\d+)$")


def _normalized(name: str) -> str:
    """A save name with its layer index, range or wildcard (and any placeholder) as ``*``."""
    return _SITE_INDEX.sub("*", _PLACEHOLDER.sub("*", name))


def _several_sites(save: str) -> bool:
    """Whether a save's name stands for several sites (a wildcard or a range of layers)."""
    found = _SITE_INDEX.search(save)
    return found is not None and not found.group(0).isdigit()


def _owner_of_pattern(ref: str, save_owner: dict[str, str]) -> str | None:
    """The invoke whose saves a templated name (``ref/mlp_out.{layer}``) reads: the saves of
    a wildcard or range of sites (``ref/mlp_out.*``) or of single sites (``ref/mlp_out.3``)
    whose names agree with it but for the layer; a single layer's name
    (``ref/mlp_out.3``) reads a save of a wildcard or range of sites."""
    templated = bool(_PLACEHOLDER.search(ref))
    if not templated and not _SITE_INDEX.search(ref):
        return None
    pattern = _normalized(ref)
    owners = {
        owner
        for save, owner in save_owner.items()
        if _normalized(save) == pattern and (templated or _several_sites(save))
    }
    return owners.pop() if len(owners) == 1 else None


def order_stages(ctx: SpecContext) -> dict[str, int]:
    """Stage of each invoke: 0 when it reads nothing, else one past everything it reads."""
    deps = _dependencies(ctx)
    for invoke, refs in kl_dependencies(ctx).items():  # a kl metric reads its reference
        for ref, where in refs.items():
            deps[invoke].setdefault(ref, where)
    stages: dict[str, int] = {}
    visiting: list[str] = []

    def visit(name: str) -> int:
        if name in stages:
            return stages[name]
        visiting.append(name)
        stage = 0
        for dep, where in deps[name].items():
            if dep in visiting:
                loop = visiting[visiting.index(dep) :] + [dep]
                ctx.fail(
                    "cycle",
                    "invokes read from each other in a loop: "
                    + " -> ".join(f"'{n}'" for n in loop),
                    where,
                    "an invoke can only read from invokes that do not read from it",
                )
                continue
            stage = max(stage, visit(dep) + 1)
        visiting.pop()
        stages[name] = stage
        return stage

    for name in ctx.spec.invokes:
        visit(name)
    return stages


def _dependencies(ctx: SpecContext) -> dict[str, dict[str, SpecPath]]:
    """invoke -> {invoke it reads: where}, from its ops' sources and saved values (located
    issues for references to nothing and to itself)."""
    save_owner = {save: owner for save, (owner, _) in ctx.save_names.items()}
    deps: dict[str, dict[str, SpecPath]] = {name: {} for name in ctx.spec.invokes}
    for name, invoke in ctx.spec.invokes.items():
        for i, op in enumerate(invoke.ops):  # a path_patch's unpatched run, when found
            if isinstance(op, S.PathPatchOp) and op.base is None:
                base = path_base(ctx, name, op)
                if base is not None:
                    deps[name].setdefault(base, ("invokes", name, "ops", i))
        for i, source, ref, where in _sources_of(invoke):
            op_path: SpecPath = ("invokes", name, "ops", i, *where)
            if source == "invoke":
                _invoke_dependency(ctx, deps[name], name, invoke.ops[i].op, ref, op_path)
            else:
                _saved_dependency(ctx, deps[name], name, save_owner, ref, op_path)
    return deps


def _invoke_dependency(
    ctx: SpecContext, deps: dict[str, SpecPath], name: str, what: str, ref: str, where: SpecPath
) -> None:
    """An op of ``name`` (a ``what``) reads invoke ``ref``."""
    names = list(ctx.spec.invokes)
    if ref not in ctx.spec.invokes:
        hint = did_you_mean(ref, names) or "invokes: " + ", ".join(names)
        ctx.fail("unknown-invoke", f"no invoke named '{ref}'", where, hint)
    elif ref == name:
        field_name = where[-1]
        ctx.fail(
            "self-patch",
            f"an invoke cannot {'patch from' if what == 'patch' else 'read'} itself"
            + ("" if what == "patch" else f" ({what} reads '{field_name}' first)"),
            where,
            "patch from another invoke; to keep a value of this one, use a save op"
            if what == "patch"
            else "give the reference prompts an invoke of their own",
        )
    else:
        deps.setdefault(ref, where)


def _saved_dependency(
    ctx: SpecContext,
    deps: dict[str, SpecPath],
    name: str,
    save_owner: dict[str, str],
    ref: str,
    where: SpecPath,
) -> None:
    """An op of ``name`` reads saved value ``ref``: it runs after the invoke that saves it."""
    owner = save_owner.get(ref) or _owner_of_pattern(ref, save_owner)
    if owner is None:
        hint = did_you_mean(ref, save_owner) or (
            "saved values: " + ", ".join(save_owner) if save_owner else "add a save op"
        )
        ctx.fail("unknown-saved", f"no saved value named '{ref}'", where, hint)
    elif owner == name:
        ctx.fail(
            "self-reference",
            f"saved value '{ref}' comes from this same invoke",
            where,
            "save it in a separate invoke and read it from there",
        )
    else:
        deps.setdefault(owner, where)
