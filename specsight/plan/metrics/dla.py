"""Direct logit attribution: the final residual stream split into what wrote it (the
embedding, each attention head or layer, each MLP, the biases), each part read through the
final norm with its scale frozen at the run's value and the unembedding's direction of
target - foil. The parts sum to the model's own logit difference; ``<name>/residual`` is what
they leave of it. The values are saved at the metric's position (the final norm's input and
output, the embedding, each layer's head outputs or attention output and MLP output) and
attributed after the run (the engine's ``after.dla``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...sites import family_table
from ..refs import StoreKey
from .base import CompileEnv, ReadBatch, RowMetric, Tokens, explain_line, save_sites_at_rows

__all__ = ["DirectLogitAttribution"]

#: families whose final residual is the sum of the embedding and every layer's attention and
#: MLP outputs (parallel residuals included), with a plain linear unembedding
_ADDITIVE = ("llama", "mixtral", "phi3", "olmo2", "gpt2", "gpt_neo", "gpt_neox")
#: why the others are not (gemma2: the logits are soft-capped, tanh(logits / c) * c)
_NOT_ADDITIVE = {
    "gemma2": "Gemma 2 soft-caps its logits (tanh), so they are not a sum of the residual's parts",
    "mamba": "Mamba has no attention and its mixer is not additive over heads",
    "vit": "ViT classifies from a pooled token, not next-token logits",
}
#: per-row store keys: the final norm's input and output, the embedding, then per layer the
#: attention part (head outputs z, or attn_out) and mlp_out
_FIXED = ("norm_in", "norm_out", "embed")


@dataclass(frozen=True, kw_only=True)
class DirectLogitAttribution(RowMetric):
    """``[..., component]`` direct contributions to the target's logit (minus the foil's)."""

    kind: ClassVar[str] = "dla"
    view: ClassVar[str] = "parts"
    signed: ClassVar[bool] = True
    companions: ClassVar[tuple[str, ...]] = ("total", "residual")
    #: companions with one value per row, reduced as the metric is (see engine.aggregate)
    reduced_companions: ClassVar[tuple[str, ...]] = ("total", "residual")
    tokens: Tokens  # (target,) or (target, foil)
    #: the components reported: embed, heads or attn, mlps (bias always, last)
    parts: tuple[str, ...]
    #: how attention is attributed: per head (the heads' z through o_proj) or per layer
    heads: bool
    n_layers: int
    n_heads: int
    #: the final norm centres its input (LayerNorm) or not (RMSNorm)
    centered: bool
    #: the final norm, the unembedding, and each layer's attention output projection
    norm: str
    unembed: str
    o_proj: tuple[str, ...]
    #: per row: the final norm's input and output, the embedding, each layer's attention part,
    #: each layer's mlp_out (row-major)
    keys: tuple[StoreKey, ...]

    @classmethod
    def compile(cls, env: CompileEnv, name: str, metric: Any) -> DirectLogitAttribution:
        path = ("metrics", name)
        refs = [(metric.target, ("target",))]
        if metric.foil is not None:
            refs.append((metric.foil, ("foil",)))
        parts = env.reader(name, metric, tokens=refs)
        heads = "attn" not in metric.by
        table = _checked_family(env, path, heads)
        info = env.info
        norm_out = env.sites("final_norm", path + ("kind",))[0]
        norm, unembed = norm_out.module, table["sites"]["logits"][0]
        norm_in = env.sites(f"{norm}.input", path + ("kind",))[0]
        centered = _centered(env, path, norm)
        layers = range(info.n_layers)
        attention = env.sites(f"{'head_z' if heads else 'attn_out'}.*", path + ("by",))
        mlps = env.sites("mlp_out.*", path + ("by",))
        embed = env.sites("resid_pre.0", path + ("by",))[0]
        sites = [norm_in, norm_out, embed, *attention, *mlps]  # the order of _FIXED, then layers
        keys = save_sites_at_rows(env, "dla", name, parts, sites)
        o_proj = tuple(s.module for s in attention) if heads else ()
        assert len(attention) == len(mlps) == len(layers)
        return cls(
            **parts.fields("baseline"),
            parts=tuple(p for p in ("embed", "heads", "attn", "mlps") if p in metric.by),
            heads=heads,
            n_layers=info.n_layers,
            n_heads=info.n_heads,
            centered=centered,
            norm=norm,
            unembed=unembed,
            o_proj=o_proj,
            keys=keys,
        )

    def stored_reads(self) -> tuple[StoreKey, ...]:
        return self.keys

    def read(self, batch: ReadBatch) -> tuple[Any, Any]:
        """The model's own logit difference (what the parts add up to)."""
        picked = batch.pick(batch.logits, self.tokens)
        return (picked[:, 0] - picked[:, 1] if len(self.tokens) == 2 else picked[:, 0]), None

    def finish(self, after: Any) -> dict[str, Any]:
        per_row = len(_FIXED) + 2 * self.n_layers
        n = len(self.rows)
        keys = [self.keys[i * per_row : (i + 1) * per_row] for i in range(n)]
        stored = after.store

        def stack(j: int) -> Any:  # the j-th value of every row: [rows, width]
            return after.stack([stored[k[j]].reshape(-1) for k in keys])

        ids = self.tokens.per_row or (self.tokens.ids,) * n
        values = {
            "norm_in": stack(0),
            "norm_out": stack(1),
            "embed": stack(2),
            "attention": [stack(3 + layer) for layer in range(self.n_layers)],
            "mlps": [stack(3 + self.n_layers + layer) for layer in range(self.n_layers)],
        }
        split = after.dla(
            values,
            token_ids=[list(t) for t in ids],
            modules=(self.norm, self.unembed, self.o_proj),
            centered=self.centered,
            n_heads=self.n_heads,
        )
        reported = [split[part] for part in self.parts] + [split["bias"][:, None]]
        components = after.cat(reported, -1)
        total = after.metrics[self.name].reshape(-1)
        every = [split[p] for p in ("embed", "heads" if self.heads else "attn", "mlps", "bias")]
        parts_sum = sum(part.reshape(n, -1).sum(-1) for part in every)
        shape = tuple(self.shape)
        return {
            self.name: components.reshape(*shape, -1),
            f"{self.name}/total": total.reshape(shape),
            f"{self.name}/residual": (total - parts_sum.to(total.device)).reshape(shape),
        }

    def components(self) -> list[str]:
        """The labels of the component axis."""
        out: list[str] = []
        for part in self.parts:
            if part == "embed":
                out.append("embed")
            elif part == "heads":
                out += [f"L{l}H{h}" for l in range(self.n_layers) for h in range(self.n_heads)]  # noqa: E741
            elif part == "attn":
                out += [f"attn_out.{layer}" for layer in range(self.n_layers)]
            else:
                out += [f"mlp_out.{layer}" for layer in range(self.n_layers)]
        return [*out, "bias"]

    def suffix(self) -> tuple[str, ...]:
        return ("component",)

    def suffix_values(self, axis: str) -> list[Any] | None:
        return self.components() if axis == "component" else None

    def companion_axes(self, companion: str, axes: list[str]) -> list[str]:
        return axes[: len(axes) - 1]  # one value per cell: no component axis

    def what(self, plan: Any) -> str:
        labels = self.tokens.labels
        target = f"{labels[0]!r} - {labels[1]!r}" if len(labels) == 2 else f"{labels[0]!r}"
        return f"dla({target}, by {', '.join(self.parts)})"

    def explain(self, plan: Any) -> str:
        extra = (f"component={len(self.components())}",)
        return explain_line(self, plan, self.what(plan), extra=extra)


def _checked_family(env: CompileEnv, path: tuple[Any, ...], heads: bool) -> dict:
    """The model's site table, when its residual stream is a sum of parts DLA can split."""
    info = env.info
    family = info.family
    if family in _NOT_ADDITIVE or family not in _ADDITIVE:
        why = _NOT_ADDITIVE.get(family or "", "its residual stream's parts are not known")
        raise env.fail(
            "no-dla",
            f"dla cannot split {info.architecture}'s logits: {why}",
            path + ("kind",),
            "dla supports the Llama, Mistral, Qwen, Mixtral, Phi-3, OLMo 2, GPT-2, GPT-Neo and "
            "GPT-NeoX families",
        )
    table = family_table(info)
    assert table is not None
    attn_out, head_z = table["sites"]["attn_out"][0], table["sites"]["head_z"][0]
    if heads and not head_z.startswith(attn_out + "."):  # o_proj's output is what is added
        raise env.fail(
            "dla-heads",
            f"{info.architecture} normalises the attention output before adding it to the "
            "residual stream, so single heads' contributions do not add up",
            path + ("by",),
            "use by: [embed, attn, mlps] (per attention layer)",
        )
    return table


def _centered(env: CompileEnv, path: tuple[Any, ...], norm: str) -> bool:
    """Whether the final norm is a LayerNorm (centres) or an RMSNorm (does not)."""
    kind = dict(env.info.modules).get(norm, "")
    if "RMS" in kind:
        return False
    if "LayerNorm" in kind:
        return True
    raise env.fail(
        "no-dla",
        f"dla needs the final norm to be a LayerNorm or an RMSNorm; '{norm}' is {kind or 'unknown'}",
        path + ("kind",),
    )
