"""The ``python`` metric: one value per row from a Python function given to the run (local runs
only: a plan names the function, the engine holds it), of the row's next-token logits at the
metric's position, read a forward's rows at a time like the built-in metrics; or, with a
``site``, of the values every row holds there at that position, saved during the run and
passed to the function at once after it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..refs import StoreKey
from .base import CompileEnv, ReadBatch, RowMetric, save_sites_at_rows

__all__ = ["PythonScore"]


@dataclass(frozen=True, kw_only=True)
class PythonScore(RowMetric):
    """``fn(logits)``: [n, vocab] float32 in, [n] out; with ``site``, ``fn(values)``: the
    values the rows hold at the site, [n, width], in, [n] out."""

    kind: ClassVar[str] = "python"
    signed: ClassVar[bool] = True
    fn: str
    site: str | None = None
    #: with a site: the stored values, one per row
    keys: tuple[StoreKey, ...] = ()

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> PythonScore:
        parts = env.reader(name, metric)
        if metric.site is None:
            return cls(**parts.fields("tokens"), fn=metric.fn)
        path = ("metrics", name, "site")
        sites = env.sites(metric.site, path)
        if len(sites) != 1:
            raise env.fail(
                "python-site",
                f"'{metric.site}' names {len(sites)} sites; a python metric reads one",
                path,
                "name one site, e.g. 'resid_post.6' (sweep the invoke to read others)",
            )
        keys = save_sites_at_rows(env, "python", name, parts, sites)
        return cls(**parts.fields("tokens"), fn=metric.fn, site=sites[0].name, keys=keys)

    @property
    def buffered(self) -> bool:  # type: ignore[override]
        """Read from each forward's logits, unless it reads a site after the run."""
        return self.site is None

    def logit_reads(self) -> Any:
        return iter(()) if self.site is not None else super().logit_reads()

    def stored_reads(self) -> tuple[StoreKey, ...]:
        return self.keys

    def read(self, batch: ReadBatch) -> tuple[Any, Any]:
        return batch.call_metric(self.fn, batch.logits, str(self.name)), None

    def finish(self, after: Any) -> dict[str, Any]:
        if self.site is None:
            return {}
        values = after.stack([after.store[key].reshape(-1) for key in self.keys])
        return {self.name: after.call_metric(self.fn, values, str(self.name)).reshape(self.shape)}

    def what(self, plan: Any) -> str:
        return f"python {self.fn}({self.site or 'logits'})"
