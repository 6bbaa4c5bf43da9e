"""Compiling invoke inputs (torch-free): prompts into token ids, image files into pixel values,
tensor files into per-row inputs.

Every row has a token sequence; for images and tensors it is a placeholder of the right length
(zeros) and the real input is stored in ``ctx.inputs`` under a content hash, which the row names
(``Row.input``). Images become [channels, height, width] float32 pixels the way the model's image
processor prepares them (resize, rescale, normalise), read from ``ModelInfo.image``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from .. import spec as S
from ..errors import did_you_mean
from ..plan import InputKey, InputTensor
from .context import Abort, Context, SpecPath
from .dataset import invoke_prompts, use_dataset

__all__ = ["compile_inputs", "read_array_file", "position_labels", "existing_file"]

_GIVE = {
    "text": "this model reads text: give 'prompt'",
    "image": "this model reads images: give 'image' (image files beside the spec)",
    "tensor": "this model is built by a factory: give 'input' (a tensor file beside the spec)",
}
_KIND_OF = {"prompt": "text", "image": "image", "input": "tensor"}
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def compile_inputs(ctx: Context) -> None:
    """Fill ``ctx.tokens`` (and ``ctx.inputs`` / ``ctx.input_keys``) for every invoke."""
    model_kind = ctx.info.inputs
    shapes: dict[tuple[int, ...], str] = {}
    use_dataset(ctx, allow_files=ctx.allow_files)
    for name, invoke in ctx.spec.invokes.items():
        path: SpecPath = ("invokes", name, invoke.input_kind)
        if _KIND_OF[invoke.input_kind] != model_kind:
            ctx.fail("input-kind", f"'{invoke.input_kind}' does not fit this model", path,
                     _GIVE.get(model_kind))  # fmt: skip
            continue
        if invoke.generate is not None and model_kind != "text":
            ctx.fail("generate-input", "only text models generate", ("invokes", name, "generate"),
                     "remove 'generate'")  # fmt: skip
            continue
        try:
            if invoke.input_kind == "prompt":
                _tokenize(ctx, name, invoke)
            elif invoke.input_kind == "image":
                _images(ctx, name, invoke)
            else:
                _tensors(ctx, name, invoke, shapes)
        except Abort:
            continue


def _tokenize(ctx: Context, name: str, invoke: S.Invoke) -> None:
    ids_list = []
    per_item = name in ctx.item_invokes
    first = ctx.items.offset if ctx.items else 0  # item numbers of the whole dataset
    prompts = invoke_prompts(ctx, name, invoke)
    for i, prompt in enumerate(prompts):
        path: SpecPath = ("invokes", name, "prompt") + (
            (i,) if isinstance(invoke.prompt, list) else ()
        )
        ids = ctx.tok.encode(prompt)
        if not ids:
            which = f"item {first + i}: " if per_item else ""
            ctx.fail("empty-prompt", f"{which}prompt encodes to no tokens", path)
        limit = ctx.info.max_positions
        if limit and len(ids) > limit:
            which = f"item {first + i}: " if per_item else ""
            ctx.fail(
                "prompt-too-long",
                f"{which}prompt is {len(ids)} tokens; the model takes at most {limit}",
                path,
                "shorten the prompt",
            )
        ids_list.append(ids)
    ctx.tokens[name] = ids_list
    if per_item or prompts != invoke.prompts:  # what results show as each row's prompt
        ctx.input_names[name] = prompts  # (a template's values in, its {{ and }} undone)


def _store(ctx: Context, name: str, array: Any) -> str:
    """Keep one row's input in the plan under a content hash; returns the key."""
    digest = hashlib.sha256(str(array.dtype).encode() + str(array.shape).encode())
    digest.update(array.tobytes())
    key = InputKey("x" + digest.hexdigest()[:16])
    ctx.inputs[key] = InputTensor(
        shape=tuple(array.shape),
        dtype="int64" if str(array.dtype) == "int64" else "float32",
        values=tuple(array.reshape(-1).tolist()),
    )
    ctx.input_keys.setdefault(name, []).append(key)
    return key


def _images(ctx: Context, name: str, invoke: S.Invoke) -> None:
    image_info = ctx.info.image or {}
    seq_len = int(image_info.get("seq_len", 1))
    for i, file in enumerate(invoke.images):
        path: SpecPath = ("invokes", name, "image") + (
            (i,) if isinstance(invoke.image, list) else ()
        )
        full = existing_file(ctx, file, path, "image")
        _store(ctx, name, _pixels(ctx, full, file, path, image_info))
        ctx.tokens.setdefault(name, []).append([0] * seq_len)
        ctx.input_names.setdefault(name, []).append(file)


def _pixels(ctx: Context, full: str, file: str, path: SpecPath, image: dict[str, Any]) -> Any:
    """[channels, height, width] float32, as the model's image processor prepares them."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(full) as opened:
            picture = opened.convert("RGB" if image.get("channels", 3) == 3 else "L")
    except (UnidentifiedImageError, OSError) as exc:
        raise ctx.fail("image-file", f"cannot read image '{file}': {exc}", path,
                       "give a PNG, JPEG, BMP or other image Pillow reads") from None  # fmt: skip
    height, width = image.get("size", picture.size[::-1])
    resample = _RESAMPLE.get(str(image.get("resample", "bilinear")), 2)
    picture = picture.resize((int(width), int(height)), resample=resample)
    array = np.asarray(picture, dtype=np.float64)
    if array.ndim == 2:
        array = array[:, :, None]
    array = array * float(image.get("rescale_factor", 1 / 255))
    channels = array.shape[2]
    mean = np.asarray(image.get("image_mean", [0.0]), dtype=np.float64).reshape(-1)
    std = np.asarray(image.get("image_std", [1.0]), dtype=np.float64).reshape(-1)
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise ctx.fail("image-file", f"the model's image mean/std do not have {channels} values",
                       path, "check the model's preprocessor_config.json")  # fmt: skip
    array = (array - mean) / std
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)


def _tensors(ctx: Context, name: str, invoke: S.Invoke, shapes: dict[tuple[int, ...], str]) -> None:
    assert invoke.input is not None
    path: SpecPath = ("invokes", name, "input")
    array = read_array_file(ctx, invoke.input, path, "input")
    if array.ndim < 2:
        raise ctx.fail(
            "input-shape",
            f"input in '{invoke.input.file}' has shape {list(array.shape)}; the first axis is "
            "the batch, so it needs at least two",
            path + ("file",),
            "add a batch axis of size 1 for a single input",
        )
    row_shape = tuple(int(d) for d in array.shape[1:])
    if shapes and row_shape not in shapes:
        other_shape, other = next(iter(shapes.items()))
        raise ctx.fail(
            "input-shape",
            f"rows of '{name}' have shape {list(row_shape)} but rows of '{other}' have "
            f"{list(other_shape)}; rows run batched, so every input needs the same shape",
            path + ("file",),
            "pad the inputs to one shape",
        )
    shapes.setdefault(row_shape, name)
    import numpy as np

    if np.issubdtype(array.dtype, np.floating):
        array = array.astype("float32")
    elif np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_):
        array = array.astype("int64")
    else:
        raise ctx.fail("input-dtype", f"input has dtype {array.dtype}", path + ("file",),
                       "store floats or integers")  # fmt: skip
    seq_len = row_shape[0] if len(row_shape) >= 2 else 1
    for i in range(array.shape[0]):
        _store(ctx, name, array[i])
        ctx.tokens.setdefault(name, []).append([0] * seq_len)
        ctx.input_names.setdefault(name, []).append(f"{invoke.input.file}[{i}]")


def existing_file(ctx: Context, file: str, path: SpecPath, what: str) -> str:
    if not ctx.allow_files:
        if what == "vector":
            raise ctx.fail("file-not-allowed", "vectors from files are not accepted here", path,
                           "give the values inline")  # fmt: skip
        raise ctx.fail(
            "file-not-allowed",
            f"{what} files are not accepted here: a server never reads paths from a spec",
            path,
            "run this spec locally",
        )
    base = ctx.doc.base_dir or os.getcwd()
    full = os.path.normpath(os.path.join(base, file))
    if not os.path.isfile(full):
        folder = os.path.dirname(full)
        nearby = os.listdir(folder) if os.path.isdir(folder) else []
        hint = (
            did_you_mean(os.path.basename(full), nearby)
            or "the path is relative to the spec's folder"
        )
        raise ctx.fail("file-not-found", f"{what} file '{file}' not found", path, hint)
    return full


def read_array_file(ctx: Context, source: S.FileVector, path: SpecPath, what: str) -> Any:
    """The numpy array in a .npy or .safetensors file beside the spec (object arrays refused)."""
    full = existing_file(ctx, source.file, path + ("file",), what)
    try:
        import numpy as np

        if full.endswith(".npy"):
            return np.load(full, allow_pickle=False)
        if not full.endswith(".safetensors"):
            raise ctx.fail("vector-file", f"'{source.file}' is not a .npy or .safetensors file",
                           path + ("file",))  # fmt: skip
        from safetensors.numpy import load_file

        tensors = load_file(full)
        if source.key is None and len(tensors) != 1:
            raise ctx.fail(
                "vector-key",
                f"'{source.file}' holds {len(tensors)} tensors; say which one",
                path,
                "add key: one of " + ", ".join(sorted(tensors)),
            )
        key = source.key or next(iter(tensors))
        if key not in tensors:
            raise ctx.fail("vector-key", f"no tensor '{key}' in '{source.file}'", path + ("key",),
                           did_you_mean(key, tensors))  # fmt: skip
        return tensors[key]
    except Abort:
        raise
    except Exception as exc:  # corrupt file
        raise ctx.fail(
            "vector-file", f"cannot read '{source.file}': {exc}", path + ("file",)
        ) from None


def position_labels(ctx: Context, name: str) -> list[str]:
    """Labels of an invoke's positions: token strings, image patches, or indices."""
    tokens = ctx.tokens[name][0]
    kind = ctx.spec.invokes[name].input_kind
    if kind == "prompt":
        return ctx.tok.token_strs(tokens)
    if kind == "image":
        per_row = (ctx.info.image or {}).get("grid", [1, len(tokens) - 1])[1]
        return ["[CLS]"] + [f"p{p // per_row},{p % per_row}" for p in range(len(tokens) - 1)]
    return [str(i) for i in range(len(tokens))]
