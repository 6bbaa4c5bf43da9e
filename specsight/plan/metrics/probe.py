"""Linear probes: each site's value at the metric's position is saved for every item of the
dataset, and after the run one logistic regression per site learns the item's ``label`` from
it on a seeded training split (the engine's ``after.probes``). The result is the held-out
accuracy per site, with the AUROC (two classes), the training accuracy, and the weights and
bias that apply to the raw activations beside it."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ...errors import did_you_mean
from ..refs import StoreKey
from .base import CompileEnv, RowMetric, explain_line, save_sites_at_rows

__all__ = ["Probe"]


@dataclass(frozen=True, kw_only=True)
class Probe(RowMetric):
    """``[site]`` held-out accuracies of probes trained on ``train`` items, tested on ``test``."""

    kind: ClassVar[str] = "probe"
    view: ClassVar[str] = "probe"
    buffered: ClassVar[bool] = False
    companions: ClassVar[tuple[str, ...]] = (
        "auroc",
        "train_accuracy",
        "weight",
        "bias",
        "held_out",
    )
    #: the classes, sorted (ints by value, else as strings); ``labels``: each item's index
    classes: tuple[str, ...]
    labels: tuple[int, ...]
    train: tuple[int, ...]
    test: tuple[int, ...]
    l2: float
    max_iter: int
    seed: int
    sites: tuple[str, ...]
    #: the stored values, row-major over items x sites
    keys: tuple[StoreKey, ...]

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> Probe:
        path = ("metrics", name)
        parts = env.reader(name, metric)
        if parts.axes != ("item",):
            raise env.fail(
                "bad-probe",
                f"a probe trains on the items of a dataset; '{metric.invoke}' has axes "
                f"{list(parts.axes) or 'none'}",
                path + ("invoke",),
                "probe an invoke whose prompt names a dataset column, without a sweep",
            )
        classes, labels = _classes(env.item_values(metric.label))
        train, test = _checked_split(env, path, metric, classes, labels)
        sites = env.sites(metric.site, path + ("site",))
        for site in sites:
            if site.heads is not None or site.io == "pattern":
                raise env.fail(
                    "probe-site",
                    f"a probe reads whole-width sites; '{site.name}' is split into heads",
                    path + ("site",),
                    "use e.g. 'resid_post.*', 'attn_out.*' or 'mlp_out.*'",
                )
        keys = save_sites_at_rows(env, "probe", name, parts, sites)
        record = cls(
            **parts.fields("baseline", "tokens", "reduce"),
            classes=classes,
            labels=labels,
            train=train,
            test=test,
            l2=metric.l2,
            max_iter=metric.max_iter,
            seed=metric.split.seed,
            sites=tuple(s.name for s in sites),
            keys=tuple(keys),
        )
        return replace(record, axes=(), shape=())

    def stored_reads(self) -> tuple[StoreKey, ...]:
        return self.keys

    def logit_reads(self) -> Any:
        return iter(())  # it reads stored values, not the output

    def finish(self, after: Any) -> dict[str, Any]:
        n_sites = len(self.sites)
        per_site = [
            after.stack([after.store[k].reshape(-1) for k in self.keys[i::n_sites]])
            for i in range(n_sites)
        ]
        out = after.probes(
            per_site,
            labels=list(self.labels),
            n_classes=len(self.classes),
            split=(list(self.train), list(self.test)),
            l2=self.l2,
            max_iter=self.max_iter,
        )
        named = {self.name: out.pop("accuracy")}
        named.update({f"{self.name}/{key}": value for key, value in out.items()})
        held_out = [0.0] * len(self.labels)
        for i in self.test:
            held_out[i] = 1.0
        named[f"{self.name}/held_out"] = after.tensor(held_out)
        return named

    def suffix(self) -> tuple[str, ...]:
        return ("site",)

    def suffix_values(self, axis: str) -> list[Any] | None:
        return list(self.sites) if axis == "site" else None

    def companion_axes(self, companion: str, axes: list[str]) -> list[str]:
        if companion == "held_out":  # 1 for the items the accuracy is measured on
            return ["item"]
        if companion == "weight":
            return [*axes, "output", "hidden"]
        return [*axes, "output"] if companion == "bias" else axes

    def manifest_extra(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "split": {"train": len(self.train), "test": len(self.test), "seed": self.seed},
            "outputs": "one logit of the last class" if len(self.classes) == 2 else "classes",
        }

    def what(self, plan: Any) -> str:
        return (
            f"probe({len(self.classes)} classes, {len(self.train)} train / {len(self.test)} "
            f"held-out items, sites {self.sites[0]}..{self.sites[-1]})"
        )

    def explain(self, plan: Any) -> str:
        return explain_line(self, plan, self.what(plan), extra=(f"site={len(self.sites)}",))


def _checked_split(
    env: CompileEnv,
    path: tuple[Any, ...],
    metric: Any,
    classes: tuple[str, ...],
    labels: tuple[int, ...],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The training and held-out items, after the checks that the labels and the split allow
    a probe (located issues when not)."""
    if len(classes) < 2:
        raise env.fail(
            "probe-classes",
            f"the label column {metric.label} has one class ({classes[0]!r}) over the "
            f"{len(labels)} items: there is nothing to tell apart",
            path + ("label",),
            "label the items with a column that takes at least two values",
        )
    split = metric.split
    columns = env.item_columns()
    if split.by and split.by.strip("{}") not in columns:
        raise env.fail(
            "unknown-column",
            f"the dataset has no column '{split.by.strip('{}')}'",
            path + ("split", "by"),
            did_you_mean(split.by.strip("{}"), columns) or "columns: " + ", ".join(columns),
        )
    groups = env.item_values(split.by) if split.by else list(range(len(labels)))
    train, test = _split(groups, split.test, split.seed)
    if not train or not test:
        raise env.fail(
            "probe-split",
            f"the split needs two groups at least: {split.by} has one value",
            path + ("split",),
            "group by a column with more values, or use more items",
        )
    if len({labels[i] for i in train}) < 2:
        raise env.fail(
            "probe-classes",
            f"the {len(train)} training items of the split hold one class",
            path + ("split",),
            "use more items, a smaller split.test, or another split.seed",
        )
    return train, test


def _classes(values: list[Any]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Sorted class names (ints by value when every label is an int) and each item's index."""
    numeric = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    ordered = sorted(set(values)) if numeric else sorted({str(v) for v in values})
    index = {str(v): i for i, v in enumerate(ordered)}
    return tuple(str(v) for v in ordered), tuple(index[str(v)] for v in values)


def _split(groups: list[Any], test: float, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A seeded permutation of the groups (each item its own, unless ``split.by`` names a
    column): the first round(groups * test) (at least 1, not all) held out with their items."""
    names = sorted({str(g) for g in groups})
    random.Random(seed).shuffle(names)
    n_test = min(len(names) - 1, max(1, round(len(names) * test)))
    held = set(names[:n_test])
    train = tuple(i for i, g in enumerate(groups) if str(g) not in held)
    return train, tuple(i for i, g in enumerate(groups) if str(g) in held)
