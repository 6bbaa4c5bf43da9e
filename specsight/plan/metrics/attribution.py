"""Attribution patching: for every site and position, ``grad . (clean - corrupt)``, where
``grad`` is the gradient of the corrupted run's logit difference (target - foil) at that site:
a first-order estimate of what patching the clean value in would do, from one clean forward and
one corrupted forward and backward. The clean values are saved on the clean row; the corrupted
values and their gradients on the corrupted row, whose logit difference the backward pass
starts from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import format_path
from ..ops import Grad, Save
from ..records import site_fields
from ..refs import InvokeRef, ResultRef, RowRef, Rows, StoreKey
from .base import CompileEnv, ReadBatch, RowMetric, Tokens, explain_line

__all__ = ["Attribution"]


@dataclass(frozen=True, kw_only=True)
class Attribution(RowMetric):
    """``[site, pos]`` estimates of patching ``clean`` into the measured (corrupted) invoke."""

    kind: ClassVar[str] = "attribution"
    signed: ClassVar[bool] = True
    buffered: ClassVar[bool] = False
    tokens: Tokens  # (target, foil)
    clean: InvokeRef
    sites: tuple[str, ...]
    n_positions: int
    #: per site: the stored clean values, corrupted values and gradients
    keys: tuple[tuple[StoreKey, StoreKey, StoreKey], ...]

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> Attribution:
        path = ("metrics", name)
        clean = env.single_prompt(metric.clean, path + ("clean",))
        corrupt = env.single_prompt(metric.corrupt, path + ("corrupt",))
        if len(clean) != len(corrupt):
            raise env.fail(
                "bad-attribution",
                f"'{metric.clean}' has {len(clean)} tokens but '{metric.corrupt}' has "
                f"{len(corrupt)}; attribution compares them position by position",
                path + ("corrupt",),
                "use prompts of the same token length",
            )
        sites = env.sites(metric.site, path + ("site",))
        if any(site.heads is not None or site.io == "pattern" for site in sites):
            raise env.fail(
                "bad-attribution",
                "attribution works on whole-width sites (resid_*, attn_out, mlp_out, ...)",
                path + ("site",),
                "use e.g. 'resid_post.*'",
            )
        position = env.position(metric.position, corrupt, path + ("position",))
        ids = (env.token_id(metric.target, path + ("target",)), env.token_id(metric.foil, path + ("foil",)))  # fmt: skip
        rows = {role: RowRef(env.row(invoke, 0, 0)) for role, invoke in (("clean", metric.clean), ("corrupt", metric.corrupt))}  # fmt: skip
        keys = []
        for site in sites:
            triple = tuple(
                StoreKey(f"attr/{name}/{r}/{site.name}") for r in ("clean", "corrupt", "grad")
            )
            at = site_fields(site)
            at.update(positions=tuple(range(len(corrupt))), origin=format_path(path))
            env.add_op(Save(**at, row=rows["clean"], store=triple[0]))
            env.add_op(Save(**at, row=rows["corrupt"], store=triple[1]))
            env.add_op(Grad(**at, row=rows["corrupt"], store=triple[2]))
            keys.append(triple)
        return cls(
            name=ResultRef(name),
            invoke=InvokeRef(metric.corrupt),
            rows=Rows((rows["corrupt"],)),
            positions=(position,),
            tokens=Tokens(ids=ids, labels=tuple(env.token_str(t) for t in ids)),
            clean=InvokeRef(metric.clean),
            sites=tuple(site.name for site in sites),
            n_positions=len(corrupt),
            keys=tuple(keys),
        )

    def stored_reads(self) -> tuple[StoreKey, ...]:
        return tuple(key for triple in self.keys for key in triple)

    def read(self, batch: ReadBatch) -> tuple[Any, Any]:
        """The logit difference the backward pass starts from."""
        both = batch.pick(batch.logits, self.tokens)
        return both[:, 0] - both[:, 1], None

    def finish(self, after: Any) -> dict[str, Any]:
        per_site = []
        for clean, corrupt, grad in self.keys:
            c, k, g = (after.store[key].float() for key in (clean, corrupt, grad))
            per_site.append((g * (c - k)).sum(-1))
        return {self.name: after.stack(per_site).cpu()}

    def suffix(self) -> tuple[str, ...]:
        return ("site", "pos")

    def suffix_values(self, axis: str) -> list[Any] | None:
        if axis == "site":
            return list(self.sites)
        return list(range(self.n_positions)) if axis == "pos" else None

    def explain(self, plan: Any) -> str:
        target, foil = self.tokens.labels
        what = (
            f"attribution = grad({target!r} - {foil!r}) . ({self.clean} - {self.invoke}), "
            f"sites {self.sites[0]}..{self.sites[-1]},"
        )
        extra = (f"site={len(self.sites)}", f"pos={self.n_positions}")
        return explain_line(self, plan, what, extra=extra)
