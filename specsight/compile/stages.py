"""Ordering invokes into stages (torch-free): every invoke runs after the invokes it reads
from (patch sources, saved values), so each value exists before a row needs it. Save names are
collected first (duplicates refused); missing and circular references are located errors.
"""

from __future__ import annotations

from .. import spec as S
from ..errors import did_you_mean, format_path
from .context import SpecContext, SpecPath, default_save_name

__all__ = ["collect_save_names", "order_stages"]


def _sources_of(invoke: S.Invoke) -> list[tuple[int, str, str]]:
    """(op index, kind, name) for every reference an invoke's ops make: patch sources and saved values."""
    refs = []
    for i, op in enumerate(invoke.ops):
        if isinstance(op, S.PatchOp):
            refs.append((i, "invoke", op.from_))
        for attr in ("vector", "value"):
            source = getattr(op, attr, None)
            if isinstance(source, S.SavedVector):
                refs.append((i, "saved", source.saved))
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


def order_stages(ctx: SpecContext) -> dict[str, int]:
    """Stage of each invoke: 0 when it reads nothing, else one past everything it reads."""
    names = list(ctx.spec.invokes)
    save_owner = {save: owner for save, (owner, _) in ctx.save_names.items()}
    deps: dict[str, dict[str, SpecPath]] = {name: {} for name in names}
    for name, invoke in ctx.spec.invokes.items():
        for i, kind, ref in _sources_of(invoke):
            op_path: SpecPath = ("invokes", name, "ops", i)
            if kind == "invoke":
                if ref not in ctx.spec.invokes:
                    hint = did_you_mean(ref, names) or "invokes: " + ", ".join(names)
                    ctx.fail(
                        "unknown-invoke", f"no invoke named '{ref}'", op_path + ("from",), hint
                    )
                elif ref == name:
                    ctx.fail(
                        "self-patch",
                        "an invoke cannot patch from itself",
                        op_path + ("from",),
                        "patch from another invoke; to keep a value of this one, use a save op",
                    )
                else:
                    deps[name].setdefault(ref, op_path + ("from",))
            else:
                attr = "vector" if "vector" in type(invoke.ops[i]).model_fields else "value"
                owner = save_owner.get(ref)
                if owner is None:
                    hint = did_you_mean(ref, save_owner) or (
                        "saved values: " + ", ".join(save_owner) if save_owner else "add a save op"
                    )
                    ctx.fail(
                        "unknown-saved",
                        f"no saved value named '{ref}'",
                        op_path + (attr, "saved"),
                        hint,
                    )
                elif owner == name:
                    ctx.fail(
                        "self-reference",
                        f"saved value '{ref}' comes from this same invoke",
                        op_path + (attr, "saved"),
                        "save it in a separate invoke and read it from there",
                    )
                else:
                    deps[name].setdefault(owner, op_path + (attr, "saved"))
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

    for name in names:
        visit(name)
    return stages
