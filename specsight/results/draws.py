"""What a run drew at random, recorded in the manifest (``draws``) so that a reader can check
it: for each ``noise`` op, its seed per item (or prompt), the std it used and, with ``std_of``,
the standard deviation it measured; for each ``resample_ablate`` op, the permutation of items
it read.

A noise op adds ``std * z`` at its positions, ``z`` drawn as
``torch.Generator().manual_seed(seeds[i])`` then ``torch.randn(values' shape)`` (float32, on the
CPU), ``seeds[i] = (seed * 1_000_003 + i) % 2**63`` for item (or prompt) ``i``; with ``std_of``,
``std = scale * empirical_std``, the standard deviation of every value the reference invoke's
rows hold at the site. A resample ablation gives item ``i`` the site's value of item
``permutation[i]`` (a seeded one-cycle shuffle: no item reads itself).
"""

from __future__ import annotations

from typing import Any

from .. import spec as S
from ..compile.ablations import derangement, noise_seed
from ..engine.ablate import spread_key
from ..errors import format_path
from ..plan import Plan
from ..plan.ops.ablate import Noise

__all__ = ["record_draws"]


def _noise(
    plan: Plan, origin: str, invoke: str, op: S.NoiseOp, spreads: dict[str, float]
) -> dict[str, Any]:
    n = plan.invokes[invoke].prompts if invoke in plan.invokes else 0
    entry: dict[str, Any] = {
        "op": origin,
        "kind": "noise",
        "invoke": invoke,
        "seed": int(op.seed),
        "seeds": [noise_seed(int(op.seed), i) for i in range(n)],
    }
    if op.std_of is None:
        return {**entry, "std": float(op.std)}
    measured = None
    for planned in plan.ops:
        if isinstance(planned, Noise) and planned.origin == origin and planned.sources:
            measured = spreads.get(spread_key(planned.sources, planned.cols))
            if measured is not None:
                break
    scale = float(op.scale)
    return {
        **entry,
        "std_of": op.std_of,
        "scale": scale,
        "empirical_std": measured,
        "std": None if measured is None else scale * measured,
    }


def record_draws(spec: S.Spec, plan: Plan, spreads: dict[str, float]) -> list[dict[str, Any]]:
    """One entry per op of the spec that draws at random, in spec order."""
    out = []
    for invoke, body in spec.invokes.items():
        for index, op in enumerate(body.ops or ()):
            origin = format_path(("invokes", invoke, "ops", index))
            if isinstance(op, S.NoiseOp):
                out.append(_noise(plan, origin, invoke, op, spreads))
            elif isinstance(op, S.ResampleAblateOp):
                n = plan.invokes[invoke].prompts if invoke in plan.invokes else 0
                out.append(
                    {
                        "op": origin,
                        "kind": "resample_ablate",
                        "invoke": invoke,
                        "from": op.from_,
                        "seed": int(op.seed),
                        "permutation": derangement(n, int(op.seed)) if n > 1 else [],
                    }
                )
    return out
