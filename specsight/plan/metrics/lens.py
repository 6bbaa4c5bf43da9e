"""The logit lens: residual streams saved at the metric's position, decoded after the run
through the final norm and the unembedding (as the model's own output is). Per site: the
probability of ``token`` (or of each row's own, or of the top token), and the top k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...sites import family_table
from ..refs import StoreKey
from .base import CompileEnv, RowMetric, Tokens, explain_line, save_sites_at_rows

__all__ = ["LogitLens"]


@dataclass(frozen=True, kw_only=True)
class LogitLens(RowMetric):
    """Decoded residual streams of ``sites`` at each row's position."""

    kind: ClassVar[str] = "logit_lens"
    view: ClassVar[str] = "lens"
    ranks_tokens: ClassVar[bool] = True
    companions: ClassVar[tuple[str, ...]] = ("ids", "probs")
    companion_trailing: ClassVar[tuple[str, ...]] = ("k",)  # each site's top k
    buffered: ClassVar[bool] = False
    tokens: Tokens  # () or (token,)
    k: int
    sites: tuple[str, ...]
    #: the stored residuals, row-major over rows x sites
    keys: tuple[StoreKey, ...]
    #: the modules that decode them: the final norm and the unembedding
    decode: tuple[str, str]

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> LogitLens:
        refs = [(metric.token, ("token",))] if metric.token is not None else []
        parts = env.reader(name, metric, tokens=refs)
        path = ("metrics", name)
        table = family_table(env.info)
        if table is None or not {"final_norm", "logits"} <= set(table["sites"]):
            raise env.fail(
                "no-lens",
                f"logit_lens needs the final norm and unembedding, unknown for "
                f"{env.info.architecture}",
                path + ("kind",),
            )
        sites = env.sites(metric.site, path + ("site",))
        for site in sites:
            if site.heads is not None or site.width not in (None, env.info.d_model):
                raise env.fail(
                    "lens-site",
                    f"logit_lens decodes residual-stream sites; '{site.name}' is not d_model wide",
                    path + ("site",),
                    "use resid_post.*, resid_mid.*, attn_out.* or mlp_out.*",
                )
        keys = save_sites_at_rows(env, "lens", name, parts, sites)
        decode = (table["sites"]["final_norm"][0], table["sites"]["logits"][0])
        return cls(
            **parts.fields("baseline"),
            k=metric.k,
            sites=tuple(s.name for s in sites),
            keys=tuple(keys),
            decode=decode,
        )

    def stored_reads(self) -> tuple[StoreKey, ...]:
        return self.keys

    def logit_reads(self) -> Any:
        return iter(())  # it decodes stored residuals, not the output

    def finish(self, after: Any) -> dict[str, Any]:
        probs = after.decode([after.store[key] for key in self.keys], self.decode)
        top_probs, top_ids = probs.topk(self.k, dim=-1)
        if self.tokens.per_row:  # each row's own token, for each of its sites
            ids = [t[0] for t in self.tokens.per_row for _ in self.sites]
            headline = probs.gather(1, after.index(ids, probs)[:, None])[:, 0]
        elif self.tokens.ids:
            headline = probs[:, self.tokens.ids[0]]
        else:
            headline = top_probs[:, 0]
        shape = (*self.shape, len(self.sites))
        return {
            self.name: headline.cpu().reshape(shape),
            f"{self.name}/ids": top_ids.cpu().reshape(*shape, -1),
            f"{self.name}/probs": top_probs.cpu().reshape(*shape, -1),
        }

    def suffix(self) -> tuple[str, ...]:
        return ("site",)

    def suffix_values(self, axis: str) -> list[Any] | None:
        return list(self.sites) if axis == "site" else None

    def explain(self, plan: Any) -> str:
        token = f"{self.tokens.labels[0]!r}, " if self.tokens.labels else ""
        what = f"logit_lens({token}k={self.k}, sites {self.sites[0]}..{self.sites[-1]})"
        return explain_line(self, plan, what, extra=(f"site={len(self.sites)}",))
