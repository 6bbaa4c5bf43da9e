"""Sparse autoencoders at run time: an SAE's weights (SAELens's folder format, read with
safetensors), its encoder and decoder, and the parts its sites show (``features``,
``recon``, ``error``).

An SAE runs in float32 whatever the model's dtype. A change to a part goes back into the
model as a change of its input: ``(new - old) @ W_dec`` for features (so zeroing feature i
subtracts exactly its activation times its decoder row, and the error term is kept), ``new -
old`` for the reconstruction and the error; untouched parts change nothing. A transcoder
encodes the value of one site (``x``) and decodes into another's (``out``): its changes go
into ``out``, its error is ``out`` minus the decoding (plus ``x @ W_skip.T`` for skip
transcoders).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import RunError
from ..plan import SaeInfo, SaeRef
from .views import token_major

__all__ = ["SaeHooks", "SparseAutoencoder", "WEIGHTS_FILE"]

WEIGHTS_FILE = "sae_weights.safetensors"


class SparseAutoencoder:
    """One SAE's weights on a device, and what it computes."""

    def __init__(self, info: SaeInfo, device: torch.device):
        self.info = info
        file = os.path.join(info.folder, WEIGHTS_FILE)
        try:
            weights = load_file(file)
        except (OSError, ValueError) as exc:
            raise RunError(
                f"SAE weights '{file}' cannot be read: {exc}", hint="check the SAE folder"
            ) from None
        self.w_enc, self.w_dec, self.b_enc, self.b_dec = (
            weights[k].to(device, torch.float32) for k in ("W_enc", "W_dec", "b_enc", "b_dec")
        )
        self.threshold = self.w_skip = None
        if info.architecture.startswith("jumprelu"):
            self.threshold = weights["threshold"].to(device, torch.float32)
        if "skip" in info.architecture:
            self.w_skip = weights["W_skip"].to(device, torch.float32)

    def _norm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """How the SAE normalises its inputs (SAELens's ``normalize_activations``): the
        scale and shift that map a normalised value back, per position."""
        how = self.info.normalize_activations
        if how == "constant_norm_rescale":
            scale = x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5
            return scale, torch.zeros_like(scale)
        if how == "layer_norm":
            return x.std(dim=-1, keepdim=True), x.mean(dim=-1, keepdim=True)
        one = torch.ones((*x.shape[:-1], 1), device=x.device)
        return one, torch.zeros_like(one)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations of inputs ``x`` [..., d_in] (float32)."""
        x = x.float()
        how = self.info.normalize_activations
        if how == "constant_norm_rescale":
            x = x * (x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True))
        elif how == "layer_norm":
            x = (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True) + 1e-5)
        if self.info.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.w_enc + self.b_enc
        if self.threshold is not None:
            return torch.relu(pre) * (pre > self.threshold)
        acts = torch.relu(pre)
        if self.info.architecture == "topk":
            assert self.info.k is not None
            top = acts.topk(self.info.k, dim=-1)
            acts = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        return acts

    def decode(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of inputs ``x`` from their features (normalised back; a skip
        transcoder's skip term added)."""
        scale, shift = self._norm(x.float())
        decoded = (features @ self.w_dec + self.b_dec) * scale + shift
        return decoded if self.w_skip is None else decoded + x.float() @ self.w_skip.T

    def part(self, part: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What the site ``sae.NAME.<part>`` shows for inputs ``x`` (``out``: the value it
        reconstructs: ``x`` itself, or the site a transcoder stands in for)."""
        features = self.encode(x)
        if part == "features":
            return features
        recon = self.decode(features, x)
        return recon if part == "recon" else out.float() - recon

    def change(
        self, part: str, old: torch.Tensor, new: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """How the SAE's input ``x`` changes when a part goes from ``old`` to ``new``."""
        if part != "features":
            return new - old
        scale = self._norm(x.float())[0]
        diff = new - old
        if diff.requires_grad or diff.dim() != 3:
            return (diff @ self.w_dec) * scale
        changed = diff.nonzero(as_tuple=True)
        if len(changed[0]) * 8 > diff.numel():  # most features changed: a dense product
            return (diff @ self.w_dec) * scale
        # few changed (a feature sweep's one per row): each change times its decoder row
        delta = torch.zeros((*diff.shape[:-1], self.w_dec.shape[1]), device=diff.device)
        rows = diff[changed][:, None] * self.w_dec[changed[2]]
        return delta.index_put_(changed[:2], rows, accumulate=True) * scale


class SaeHooks:
    """The runner's side of SAE sites (mixed into :class:`~.runner.Runner`): the hook at an
    SAE's site, and a transcoder's hooks at its input and output sites."""

    plan: Any
    device: torch.device
    active: Any
    grad_hooks: Any
    _saes: dict[SaeRef, SparseAutoencoder]
    transcoder_inputs: dict[SaeRef, torch.Tensor]

    def _apply(self, level: Any, hidden: torch.Tensor) -> None: ...

    def sae_hook(self, site: Any) -> Callable[[torch.Tensor], torch.Tensor | None]:
        """At the site an SAE reads: its part (features, recon, error) at the positions the
        ops touch, the ops applied to it, and the change written back into the site."""
        module, io, ref, part = site
        assert ref is not None and part is not None

        def apply(hidden: torch.Tensor) -> torch.Tensor | None:
            active = self.active
            levels = active.sites.get(site) if active is not None else None
            if not levels:
                return None
            n_rows, seq_len = len(active.forward.rows), active.forward.seq_len

            def per_row(t: torch.Tensor) -> torch.Tensor:  # [rows, pos, width], writes go through
                return t if t.dim() == 3 else token_major(t, n_rows, seq_len, module)

            lo, hi = active.spans[site]
            sae = self.sae(ref)
            rows = per_row(hidden)
            read = self.transcoder_inputs.get(ref, hidden) if sae.info.transcoder else hidden
            x = per_row(read)[:, lo:hi]
            before = sae.part(part, x, rows[:, lo:hi])
            writes = any(level.kind.writes for groups in levels for level in groups)
            # gradients reach a part only through a change written back, here one of zero
            writes = writes or (self.grad_hooks is not None and before.requires_grad)
            value = before.clone() if writes else before
            for groups in levels:
                for level in groups:
                    self._apply(level, value)
            if not writes:
                return None
            delta = sae.change(part, before, value, x).to(hidden.dtype)
            replace = io == "output" or (hidden._base is not None and hidden.requires_grad)
            if replace:
                hidden = hidden.clone()
                rows = per_row(hidden)
            rows[:, lo:hi] += delta
            return hidden if replace else None

        return apply

    def transcoder_keeper(self, ref: SaeRef) -> Callable[[torch.Tensor], None]:
        """At a transcoder's input site: keep the value for its hooks at the output site."""

        def keep(hidden: torch.Tensor) -> None:
            self.transcoder_inputs[ref] = hidden

        return keep

    def transcoder_output(self, ref: SaeRef) -> Callable[[torch.Tensor], torch.Tensor]:
        """At a transcoder's output site (``keep_error: false``): the value replaced by the
        transcoder's decoding of its input, at every position."""

        def replace(hidden: torch.Tensor) -> torch.Tensor:
            sae, x = self.sae(ref), self.transcoder_inputs[ref]
            return sae.decode(sae.encode(x), x).to(hidden.dtype).reshape(hidden.shape)

        return replace

    def sae(self, ref: SaeRef) -> SparseAutoencoder:
        """The plan's SAE ``ref``, loaded once per run."""
        if ref not in self._saes:
            self._saes[ref] = SparseAutoencoder(self.plan.saes[ref], self.device)
        return self._saes[ref]
