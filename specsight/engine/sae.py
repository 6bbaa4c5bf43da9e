"""Sparse autoencoders at run time: an SAE's weights (SAELens's folder format, read with
safetensors), its encoder and decoder, and the parts its sites show (``features``,
``recon``, ``error``).

An SAE runs in float32 whatever the model's dtype. A change to a part goes back into the
model as a change of its input: ``(new - old) @ W_dec`` for features (so zeroing feature i
subtracts exactly its activation times its decoder row, and the error term is kept), ``new -
old`` for the reconstruction and the error; untouched parts change nothing.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from ..errors import RunError
from ..plan import SaeInfo

__all__ = ["SparseAutoencoder", "WEIGHTS_FILE"]

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
        self.threshold = None
        if info.architecture == "jumprelu":
            self.threshold = weights["threshold"].to(device, torch.float32)

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
        if self.info.architecture == "jumprelu":
            assert self.threshold is not None
            return torch.relu(pre) * (pre > self.threshold)
        acts = torch.relu(pre)
        if self.info.architecture == "topk":
            assert self.info.k is not None
            top = acts.topk(self.info.k, dim=-1)
            acts = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        return acts

    def decode(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of inputs ``x`` from their features (normalised back)."""
        scale, shift = self._norm(x.float())
        return (features @ self.w_dec + self.b_dec) * scale + shift

    def part(self, part: str, x: torch.Tensor) -> torch.Tensor:
        """What the site ``sae.NAME.<part>`` shows for inputs ``x``."""
        features = self.encode(x)
        if part == "features":
            return features
        recon = self.decode(features, x)
        return recon if part == "recon" else x.float() - recon

    def change(
        self, part: str, old: torch.Tensor, new: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """How the SAE's input ``x`` changes when a part goes from ``old`` to ``new``."""
        if part == "features":
            return ((new - old) @ self.w_dec) * self._norm(x.float())[0]
        return new - old
