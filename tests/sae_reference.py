"""sae-lens (SAELens) 6.54.12 as a test oracle for SAE encode / decode, and random SAEs in its
folder format (``cfg.json`` + ``sae_weights.safetensors``) to feed both it and specsight.

sae-lens is installed ``--no-deps`` (see the Makefile): it pins ``transformer-lens<4`` and we
use transformer-lens 4, where ``HookedRootModule`` moved out of
``transformer_lens.HookedTransformer``. Its ``sae_lens/__init__.py`` imports the training and
analysis stack (which needs that old module and more), so :func:`_sae_lens_classes` skips it:
it puts a bare ``sae_lens`` package in ``sys.modules``, shims the old module for the imports of
``sae_lens.saes``, and registers the architectures we compare (what the real ``__init__`` does
last). Only ``sae_lens.registry``, ``sae_lens.saes.*``, ``sae_lens.loading.*``,
``sae_lens.util`` and ``sae_lens.constants`` are imported.

What sae-lens computes (``sae_lens/saes/sae.py``, ``standard_sae.py``, ``topk_sae.py``,
``jumprelu_sae.py``), with ``n_in``/``n_out`` the ``normalize_activations`` maps below::

    encode(x) = act(h),  h = (n_in(x) - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
      standard: relu(h)
      topk:     torch.topk(h, k) (unsorted), relu of those k values, zeros elsewhere
      jumprelu: relu(h) * (h > threshold)
    decode(f) = n_out(f @ W_dec + b_dec)

``n_in``/``n_out``: ``"none"``, ``"expected_average_only_in"``, ``"covariance_whitening"``: the
identity (on loading from disk; the trainer folds its factor into the weights before saving);
``"constant_norm_rescale"``: ``x * sqrt(d_in) / |x|`` and back; ``"layer_norm"``:
``(x - mean) / (std + 1e-5)`` (unbiased std) and ``* std + mean``. The last two keep the
statistics of the last encoded ``x`` on the module for the next decode: see
:func:`reference_decode`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

SAE_LENS_VERSION = "6.54.12"
#: the architectures registered with sae-lens here, and the ones write_random_sae writes
ARCHITECTURES = ("standard", "topk", "jumprelu")
#: what sae-lens's SAEConfig.__post_init__ accepts
NORMALIZATIONS = (
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",
)
#: the files of an SAE folder (sae_lens.constants)
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"


@functools.cache
def _sae_lens_classes() -> Any:
    """``sae_lens.saes.sae.SAE``, with standard / topk / jumprelu registered; imported once."""
    installed = importlib.metadata.version("sae-lens")  # PackageNotFoundError: `make venv`
    if installed != SAE_LENS_VERSION:
        raise ImportError(f"tests need sae-lens=={SAE_LENS_VERSION}, found {installed}")
    import transformer_lens

    if "sae_lens" not in sys.modules:
        # the bare package: sae_lens/__init__.py is never run. Its submodules import
        # __version__ and logger from it.
        spec = importlib.util.find_spec("sae_lens")
        assert spec is not None and spec.submodule_search_locations is not None
        package = types.ModuleType("sae_lens")
        package.__path__ = list(spec.submodule_search_locations)
        package.__file__ = spec.origin
        package.__version__ = SAE_LENS_VERSION  # type: ignore[attr-defined]
        package.logger = logging.getLogger("sae_lens")  # type: ignore[attr-defined]
        sys.modules["sae_lens"] = package

    old = "transformer_lens.HookedTransformer"
    shim = None
    if old not in sys.modules and importlib.util.find_spec(old) is None:
        shim = types.ModuleType(old)
        shim.HookedRootModule = transformer_lens.HookedRootModule  # type: ignore[attr-defined]
        sys.modules[old] = shim
    try:
        from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
        from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
        from sae_lens.saes.sae import SAE
        from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
        from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
        from sae_lens.saes.transcoder import (
            JumpReLUSkipTranscoder,
            JumpReLUSkipTranscoderConfig,
            JumpReLUTranscoder,
            JumpReLUTranscoderConfig,
            SkipTranscoder,
            SkipTranscoderConfig,
            Transcoder,
            TranscoderConfig,
        )
    finally:
        # sae_lens.saes.sae holds HookedRootModule now; keep transformer_lens's namespace as
        # it was for everything else in the test session
        if shim is not None and sys.modules.get(old) is shim:
            del sys.modules[old]

    classes = {
        "standard": (StandardSAE, StandardSAEConfig),
        "topk": (TopKSAE, TopKSAEConfig),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
        "transcoder": (Transcoder, TranscoderConfig),
        "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig),
        "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig),
        "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig),
    }
    for architecture, (sae_class, cfg_class) in classes.items():
        if architecture not in SAE_CLASS_REGISTRY:
            register_sae_class(architecture, sae_class, cfg_class)
    return SAE


def sae_lens_sae(folder: str | Path) -> Any:
    """The SAE in ``folder`` (SAELens's format) as sae-lens loads it: ``SAE.load_from_disk``,
    float32 on the CPU, in eval mode. A fresh object each call (the normalizations
    ``constant_norm_rescale`` and ``layer_norm`` keep state between encode and decode)."""
    sae = _sae_lens_classes().load_from_disk(str(folder), device="cpu", dtype="float32")
    return sae.eval()


def reference_encode(folder: str | Path, x: torch.Tensor) -> torch.Tensor:
    """sae-lens's feature activations of ``x`` (``[..., d_in]``) under the SAE in ``folder``:
    float32, ``[..., d_sae]``."""
    sae = sae_lens_sae(folder)
    with torch.no_grad():
        return sae.encode(x.detach().to("cpu", torch.float32))


def reference_decode(
    folder: str | Path, f: torch.Tensor, *, x: torch.Tensor | None = None
) -> torch.Tensor:
    """sae-lens's reconstruction from feature activations ``f`` (``[..., d_sae]``): float32,
    ``[..., d_in]``. For ``normalize_activations`` ``constant_norm_rescale`` and ``layer_norm``
    the un-normalisation uses the statistics of the input that was encoded, so pass that input
    as ``x`` (it is encoded first, as sae-lens's own ``forward`` does); sae-lens fails on a
    decode without one."""
    sae = sae_lens_sae(folder)
    with torch.no_grad():
        if x is not None:
            sae.encode(x.detach().to("cpu", torch.float32))
        return sae.decode(f.detach().to("cpu", torch.float32))


def _random_weights(
    seed: int, d_in: int, d_sae: int, d_out: int, architecture: str
) -> dict[str, torch.Tensor]:
    """Seeded float32 weights: ``W_enc`` ~ N(0, 1/d_in), ``b_enc`` about -0.2, decoder rows of
    norm about 1 (``W_dec`` [d_sae, d_out]), thresholds in [0.3, 0.7] for JumpReLU, and a small
    ``W_skip`` [d_out, d_in] for skip transcoders."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    weights = {
        "W_enc": randn(d_in, d_sae) / d_in**0.5,
        "W_dec": randn(d_sae, d_out) / d_out**0.5,
        "b_enc": -0.2 + 0.1 * randn(d_sae),
        "b_dec": 0.1 * randn(d_out),
    }
    if architecture.startswith("jumprelu"):
        weights["threshold"] = 0.3 + 0.4 * torch.rand(d_sae, generator=g, dtype=torch.float32)
    if "skip" in architecture:
        weights["W_skip"] = 0.1 * randn(d_out, d_in) / d_in**0.5
    return weights


def write_random_sae(
    folder: str | Path,
    architecture: str,
    d_in: int,
    d_sae: int,
    *,
    seed: int,
    k: int | None = None,
    apply_b_dec_to_input: bool = False,
    normalize_activations: str = "none",
    hook_name: str = "blocks.0.hook_resid_post",
) -> Path:
    """Write a random SAE to ``folder`` in SAELens's format and return the folder:
    ``cfg.json`` (the keys ``SAE.save_model`` writes for the architecture) and
    ``sae_weights.safetensors`` (float32 ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
    ``b_enc [d_sae]``, ``b_dec [d_in]``, and ``threshold [d_sae]`` for jumprelu).

    The same seed gives the same weights. They are scaled so that, for inputs ~ N(0, 1), the
    pre-activations are about N(-0.2, 1) (``W_enc`` ~ N(0, 1/d_in), ``b_enc`` about -0.2):
    about 40% of standard features fire, 25% of jumprelu ones (thresholds in [0.3, 0.7]),
    and topk keeps ``k`` (required for topk only). Decoder rows have norm about 1.
    Needs no sae-lens."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, not {architecture!r}")
    if normalize_activations not in NORMALIZATIONS:
        raise ValueError(f"normalize_activations must be one of {NORMALIZATIONS}")
    if (architecture == "topk") != (k is not None):
        raise ValueError("k is required for topk SAEs, and only for them")
    if k is not None and not 0 < k <= d_sae:
        raise ValueError(f"k must be in 1..d_sae ({d_sae}), not {k}")

    weights = _random_weights(seed, d_in, d_sae, d_in, architecture)

    cfg: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": normalize_activations,
        "reshape_activations": "none",
        # a sae_lens_version >= 6 here is what makes sae-lens read cfg.json as the 6.x format
        # (without one it converts it from the pre-6.0 format, handle_pre_6_0_config)
        "metadata": {
            "sae_lens_version": SAE_LENS_VERSION,
            "sae_lens_training_version": SAE_LENS_VERSION,
            "hook_name": hook_name,
        },
        "architecture": architecture,
    }
    if architecture == "topk":
        cfg["k"] = k
        cfg["rescale_acts_by_decoder_norm"] = False

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CFG_FILENAME).write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({name: w.contiguous() for name, w in weights.items()}, folder / WEIGHTS_FILENAME)
    return folder


def tiny_sae(
    folder: str | Path,
    architecture: str = "standard",
    d_sae: int = 48,
    *,
    seed: int = 1,
    **options: Any,
) -> Path:
    """A random SAE for tiny-llama's residual stream (64 wide, values ~0.03): the random
    weights of :func:`write_random_sae`, the encoder scaled up and the decoder down to the
    stream's size, so that features fire and their decoder rows are the stream's size."""
    from safetensors.torch import load_file

    folder = Path(folder)
    k = 6 if architecture == "topk" else None
    write_random_sae(folder, architecture, 64, d_sae, seed=seed, k=k, **options)
    weights = load_file(folder / WEIGHTS_FILENAME)
    weights["W_enc"] = weights["W_enc"] * 30
    weights["W_dec"], weights["b_dec"] = weights["W_dec"] * 0.03, weights["b_dec"] * 0.03
    save_file(weights, folder / WEIGHTS_FILENAME)
    return folder


#: the transcoder architectures sae-lens 6 has, as registered here
TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")


def write_random_transcoder(
    folder: str | Path, architecture: str, d_in: int, d_sae: int, d_out: int, *, seed: int
) -> Path:
    """A random transcoder in SAELens's format (``d_out`` in cfg.json; ``W_dec [d_sae,
    d_out]``, ``b_dec [d_out]``, ``W_skip [d_out, d_in]`` for skip transcoders, thresholds for
    JumpReLU ones), for inputs ~ N(0, 1) and outputs of size ~1."""
    if architecture not in TRANSCODERS:
        raise ValueError(f"architecture must be one of {TRANSCODERS}")
    weights = _random_weights(seed, d_in, d_sae, d_out, architecture)
    cfg = {
        "d_in": d_in,
        "d_sae": d_sae,
        "d_out": d_out,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAE_LENS_VERSION},
        "architecture": architecture,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CFG_FILENAME).write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({name: w.contiguous() for name, w in weights.items()}, folder / WEIGHTS_FILENAME)
    return folder
