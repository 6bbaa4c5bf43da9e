"""An SAE's strongest features (``top_features``): each row's features at the metric's
position are saved during the run (the site ``sae.NAME.features``), and after it the k largest
activations are kept, with their feature indices in ``<name>/ids``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..refs import StoreKey
from .base import CompileEnv, RowMetric, explain_line, save_sites_at_rows

__all__ = ["TopFeatures"]


@dataclass(frozen=True, kw_only=True)
class TopFeatures(RowMetric):
    """``[..., rank]`` the k largest feature activations of each row, strongest first (their
    feature indices in ``/ids``)."""

    kind: ClassVar[str] = "top_features"
    view: ClassVar[str] = "features"
    buffered: ClassVar[bool] = False
    companions: ClassVar[tuple[str, ...]] = ("ids",)
    sae: str
    k: int
    #: one stored value per row: its features at the row's position
    keys: tuple[StoreKey, ...]

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> TopFeatures:
        path = ("metrics", name)
        parts = env.reader(name, metric)
        (site,) = env.sites(f"sae.{metric.sae}.features", path + ("sae",))
        if site.width is not None and metric.k > site.width:
            raise env.fail(
                "bad-k",
                f"k = {metric.k} but SAE '{metric.sae}' has {site.width} features",
                path + ("k",),
                f"use k <= {site.width}",
            )
        keys = save_sites_at_rows(env, "features", name, parts, [site])
        return cls(**parts.fields("baseline", "tokens"), sae=metric.sae, k=metric.k, keys=keys)

    def stored_reads(self) -> tuple[StoreKey, ...]:
        return self.keys

    def logit_reads(self) -> Any:
        return iter(())  # it reads stored features, not the output

    def finish(self, after: Any) -> dict[str, Any]:
        features = after.stack([after.store[key].reshape(-1) for key in self.keys])
        top = features.float().topk(self.k, dim=-1)
        shape = (*self.shape, self.k)
        return {
            self.name: top.values.reshape(shape),
            f"{self.name}/ids": top.indices.reshape(shape),
        }

    def suffix(self) -> tuple[str, ...]:
        return ("rank",)  # claims pick ranks: {metric: top/ids, where: {rank: 0}, equals: 180}

    def suffix_values(self, axis: str) -> list[Any] | None:
        return list(range(self.k)) if axis == "rank" else None

    def what(self, plan: Any) -> str:
        return f"top_features(sae={self.sae}, k={self.k})"

    def explain(self, plan: Any) -> str:
        return explain_line(self, plan, self.what(plan), extra=(f"rank={self.k}",))
