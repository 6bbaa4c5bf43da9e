"""Direct logit attribution over the 64 IOI items of specs/ioi_dla.yaml on the built-in model:
specsight against hand-written hooks (one item per forward, and the 64 items in one padded
forward) and TransformerLens 4.3's bridge (``run_with_cache`` + ``get_full_resid_decomposition``
+ ``logit_attrs`` per item). Every method gives the same [64, 302] table (embedding, 270 heads,
30 MLPs, bias) within 1e-4 of its items' summed |parts|, or the script exits with status 1.

    python bench/dla_attribution.py            # ~1 min on 2 cores; writes the README table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "ioi_dla.yaml"
START, END = "<!-- dla:start -->", "<!-- dla:end -->"


def _items() -> list[dict[str, str]]:
    lines = (ROOT / "specs" / "data" / "ioi.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


class _Hooks:
    """Hand-written hooks that keep, for each row, what DLA reads at ``last[row]``: the first
    layer's input, each o_proj's input (the heads' z), each MLP's output, the final norm's
    input."""

    def __init__(self, model: Any):
        self.model = model
        self.kept: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        self.last: torch.Tensor | None = None
        inner = model.model

        def keep(name: str, io: str) -> Any:
            def hook(_module: Any, args: Any, output: Any = None) -> None:
                value = args[0] if io == "input" else output
                value = value[0] if isinstance(value, tuple) else value
                rows = torch.arange(value.shape[0])
                self.kept[name] = value[rows, self.last].float()

            return hook

        for i, layer in enumerate(inner.layers):
            self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(keep(f"z{i}", "input")))  # fmt: skip
            self.handles.append(layer.mlp.register_forward_hook(keep(f"mlp{i}", "output")))
        self.handles.append(inner.layers[0].register_forward_pre_hook(keep("embed", "input")))
        self.handles.append(inner.norm.register_forward_pre_hook(keep("final", "input")))

    def attribute(self, target: torch.Tensor, foil: torch.Tensor) -> torch.Tensor:
        """[rows, 302] from what the hooks kept: RMSNorm's scale written out, heads by W_O's
        column blocks."""
        model, kept = self.model, self.kept
        inner, cfg = model.model, model.config
        n_heads, d_head = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        x = kept["final"]
        rms = (x.pow(2).mean(-1, keepdim=True) + inner.norm.variance_epsilon).sqrt()
        w_u = model.lm_head.weight.float()
        u = inner.norm.weight.float() * (w_u[target] - w_u[foil]) / rms  # [rows, d_model]
        parts = [(kept["embed"] * u).sum(-1, keepdim=True)]
        for i, layer in enumerate(inner.layers):
            w_o = layer.self_attn.o_proj.weight.float().reshape(-1, n_heads, d_head)
            back = torch.einsum("dhk,rd->rhk", w_o, u)  # W_O^T u per head
            parts.append((kept[f"z{i}"].reshape(-1, n_heads, d_head) * back).sum(-1))
        parts += [(kept[f"mlp{i}"] * u).sum(-1, keepdim=True) for i in range(cfg.num_hidden_layers)]
        parts.append(torch.zeros(x.shape[0], 1))  # no biases in SmolLM2
        return torch.cat(parts, -1)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _answer_ids(lm: Any, items: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = lm.tokenizer.encode_plain
    return (
        torch.tensor([enc(row["io"])[0] for row in items]),
        torch.tensor([enc(row["s"])[0] for row in items]),
    )


def hooks_per_item(lm: Any, items: list[dict[str, str]]) -> torch.Tensor:
    hooks, (target, foil) = _Hooks(lm.model), _answer_ids(lm, items)
    rows = []
    try:
        with torch.inference_mode():
            for i, row in enumerate(items):
                ids = torch.tensor([lm.tokenizer.encode(row["clean"])])
                hooks.last = torch.tensor([ids.shape[1] - 1])
                lm.model.model(ids)  # the body only: DLA needs no logits
                rows.append(hooks.attribute(target[i : i + 1], foil[i : i + 1]))
    finally:
        hooks.close()
    return torch.cat(rows)


def hooks_batched(lm: Any, items: list[dict[str, str]]) -> torch.Tensor:
    """The expert's version: the 64 items right-padded into one forward of the body."""
    hooks, (target, foil) = _Hooks(lm.model), _answer_ids(lm, items)
    encoded = [lm.tokenizer.encode(row["clean"]) for row in items]
    longest = max(map(len, encoded))
    ids = torch.full((len(items), longest), lm.tokenizer.pad_id)
    mask = torch.zeros_like(ids)
    for i, tokens in enumerate(encoded):
        ids[i, : len(tokens)], mask[i, : len(tokens)] = torch.tensor(tokens), 1
    hooks.last = torch.tensor([len(t) - 1 for t in encoded])
    try:
        with torch.inference_mode():
            lm.model.model(ids, attention_mask=mask)
            return hooks.attribute(target, foil)
    finally:
        hooks.close()


def transformer_lens(bridge: Any, lm: Any, items: list[dict[str, str]]) -> torch.Tensor:
    target, foil = _answer_ids(lm, items)
    rows = []
    with torch.inference_mode():
        for i, row in enumerate(items):
            _, cache = bridge.run_with_cache(torch.tensor([lm.tokenizer.encode(row["clean"])]))
            stack = cache.get_full_resid_decomposition(expand_neurons=False, pos_slice=-1)
            attrs = cache.logit_attrs(
                stack, tokens=target[i : i + 1], incorrect_tokens=foil[i : i + 1], pos_slice=-1
            ).reshape(-1)
            n_heads = 270
            # TL: heads, mlps, embed, bias -> ours: embed, heads, mlps, bias
            rows.append(
                torch.cat([attrs[300:301], attrs[:n_heads], attrs[n_heads:300], attrs[301:]])
            )
    return torch.stack(rows)


def run_specsight(lm: Any) -> torch.Tensor:
    import specsight

    return specsight.run(SPEC, model=lm).metrics["dla/items"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()

    from transformer_lens.model_bridge import TransformerBridge

    from specsight.models.catalog import builtin_dir
    from specsight.models.load import load_model

    lm = load_model("smollm2-135m", device="cpu")
    bridge = TransformerBridge.boot_transformers(str(builtin_dir()), device="cpu")
    bridge.enable_compatibility_mode(
        fold_value_biases=False, center_unembed=False, disable_warnings=True
    )
    items = _items()
    methods = {
        "specsight": lambda: run_specsight(lm),
        "hooks_batched": lambda: hooks_batched(lm, items),
        "hooks_per_item": lambda: hooks_per_item(lm, items),
        "transformer_lens": lambda: transformer_lens(bridge, lm, items),
    }
    for method in methods.values():  # warm-up: one run each
        method()
    times: dict[str, list[float]] = {name: [] for name in methods}
    tables: dict[str, torch.Tensor] = {}
    for _ in range(args.repeat):  # interleaved, so a busy moment hits every method alike
        for name, method in methods.items():
            started = time.perf_counter()
            tables[name] = method()
            times[name].append(time.perf_counter() - started)
    ours = tables["specsight"]
    tol = 1e-4 * ours.abs().sum(-1, keepdim=True)
    diffs = {name: float((t - ours).abs().max()) for name, t in tables.items()}
    ok = all(bool(((t - ours).abs() <= tol).all()) for t in tables.values())
    medians = {name: statistics.median(t) for name, t in times.items()}
    lines = [
        START,
        f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"64 items, 302 parts each; median of {args.repeat} interleaved runs (model loaded).",
        "",
        "| method | seconds | specsight / method | max abs diff vs specsight |",
        "| --- | --- | --- | --- |",
    ]
    for name, median in medians.items():
        ratio = medians["specsight"] / median
        lines.append(f"| `{name}` | {median:.3f} | {ratio:.2f}× | {diffs[name]:.1e} |")
    lines += ["", f"All tables equal within 1e-4 of each item's summed |parts|: {ok}.", END]
    print("\n".join(lines))
    if not args.no_readme:
        heading = "## `dla_attribution.py`: direct logit attribution over a dataset (issue 24)\n\n"
        replace_section(START, END, "\n".join(lines), heading=heading)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
