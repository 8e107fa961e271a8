"""Image loading and CLIP preprocessing, as the Qilin-Med-VL release (LLaVA-1.5) does it.

decode (PIL, or pydicom for DICOM) -> RGB -> optional composite of up to 4 images ->
`square` (resize shortest side, centre crop; stage 1) or `pad` (paste on a square canvas of
the CLIP mean colour, then resize; stage 2) -> rescale 1/255 -> CLIP normalisation -> [3, H, W]
float32. The resize is PIL bicubic on uint8, exactly what `CLIPImageProcessorPil` (the old slow
`CLIPImageProcessor` the release used) does, so outputs agree to float32 rounding.

Release parity notes: like LLaVA's `Image.open(path).convert("RGB")`, an alpha channel is
dropped (not composited on white) and EXIF orientation is not applied.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from qilin_jax.data.errors import DataError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA's expand2square background: tuple(int(x * 255) for x in image_mean).
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
IMAGE_MODES = ("square", "pad")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

ImageSource = str | os.PathLike | bytes | Image.Image

# uint8 value -> normalised float32, per channel; computed like transformers
# (float64 rescale, cast to float32, then (x - mean) / std in float32).
_LUT = np.stack(
    [
        ((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32) - np.float32(m)) / np.float32(s)
        for m, s in zip(CLIP_MEAN, CLIP_STD)
    ]
).astype(np.float32)


def is_dicom(data: bytes, name: str = "") -> bool:
    """Returns True if the bytes look like DICOM (preamble magic or file suffix)."""
    return data[128:132] == b"DICM" or name.lower().endswith(DICOM_SUFFIXES)


def _dicom_window(ds) -> tuple[float, float] | None:
    """Returns the file's (centre, width) VOI window, first value if multi-valued, or None."""
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is None or w is None:
        return None
    try:
        c = float(c[0] if isinstance(c, Sequence) and not isinstance(c, str) else c)
        w = float(w[0] if isinstance(w, Sequence) and not isinstance(w, str) else w)
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(c) and math.isfinite(w)) or w < 1:
        return None
    return c, w


def decode_dicom(data: bytes, name: str = "<bytes>", percentiles: Sequence[float] = (0.5, 99.5)) -> Image.Image:
    """Returns an 8-bit RGB PIL image from DICOM bytes (modality LUT, VOI window, middle frame)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types for bad / unsupported files
        raise DataError(
            "corrupt_image",
            f"cannot decode DICOM {name}: {type(e).__name__}: {e} (compressed transfer syntaxes "
            "need pylibjpeg/gdcm plugins)",
        ) from e
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        # Volumes / cines: the middle frame is the most representative single slice.
        arr = arr[frames // 2]
    if spp == 3:
        # pydicom converts YBR to RGB by default; scale >8-bit colour down to uint8.
        if arr.dtype != np.uint8:
            bits = int(ds.get("BitsStored", 8) or 8)
            arr = np.clip(arr.astype(np.float64) / (2**bits - 1) * 255.0, 0, 255).round()
        return Image.fromarray(arr.astype(np.uint8), "RGB")
    if arr.ndim != 2:
        raise DataError("corrupt_image", f"DICOM {name}: unexpected pixel shape {arr.shape}")
    x = apply_modality_lut(arr, ds).astype(np.float64)  # rescale slope/intercept
    window = _dicom_window(ds)
    if window is not None:
        # DICOM PS3.3 C.11.2.1.2 linear VOI function.
        c, w = window
        y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    else:
        lo, hi = np.percentile(x, percentiles)
        if hi <= lo:
            hi = lo + 1.0
        y = (x - lo) / (hi - lo) * 255.0
    y = np.clip(y, 0, 255).round().astype(np.uint8)
    if photometric == "MONOCHROME1":  # low values are white
        y = 255 - y
    return Image.fromarray(y, "L").convert("RGB")


def _high_bit_to_rgb(img: Image.Image) -> Image.Image:
    """Maps 16/32-bit grayscale (PNG 'I;16', 'I', 'F') to 8-bit RGB by min-max scaling."""
    x = np.asarray(img, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    y = np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo) * 255.0
    return Image.fromarray(y.round().astype(np.uint8), "L").convert("RGB")


def load_image(
    src: ImageSource,
    name: str | None = None,
    *,
    dicom_percentiles: Sequence[float] = (0.5, 99.5),
    draft_size: int | None = None,
) -> Image.Image:
    """Returns an RGB PIL image from a path, bytes or PIL image; DataError if missing or corrupt.

    draft_size: if set, JPEGs are decoded with DCT scaling to at least this size (much faster
    for large files, not bit-identical to a full decode).
    """
    if isinstance(src, Image.Image):
        img = src
        name = name or "<PIL image>"
    else:
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
            name = name or "<bytes>"
        else:
            path = os.fspath(src)
            name = name or path
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError as e:
                raise DataError("missing_image", f"image file not found: {path} (check image_folder)") from e
            except OSError as e:
                raise DataError("missing_image", f"cannot read image file {path}: {e}") from e
        if not data:
            raise DataError("corrupt_image", f"image {name} is empty (0 bytes)")
        if is_dicom(data, name):
            return decode_dicom(data, name, dicom_percentiles)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                if draft_size and img.format == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))
                img.load()  # decode now, so truncated files fail here
        except UnidentifiedImageError:
            raise DataError("corrupt_image", f"cannot decode image {name}: not a recognised image format") from None
        except (
            OSError,
            SyntaxError,
            ValueError,
            EOFError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ) as e:
            raise DataError("corrupt_image", f"cannot decode image {name}: {type(e).__name__}: {e}") from e
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _high_bit_to_rgb(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def composite_images(images: Sequence[Image.Image], max_images: int = 4) -> Image.Image:
    """Returns one image: the inputs side by side or stacked, whichever aspect is nearer 1.

    Horizontal: every image scaled (bicubic) to the smallest height; vertical: to the smallest
    width (no upsampling of the smallest image, no gaps). Ties go to horizontal.
    """
    if not images:
        raise ValueError("composite_images needs at least one image")
    if len(images) > max_images:
        raise DataError("too_many_images", f"{len(images)} images > composite_max={max_images}")
    if len(images) == 1:
        return images[0]
    sizes = [im.size for im in images]  # (w, h)
    h = min(s[1] for s in sizes)
    w_h = [max(1, round(sw * h / sh)) for sw, sh in sizes]
    aspect_h = sum(w_h) / h
    w = min(s[0] for s in sizes)
    h_v = [max(1, round(sh * w / sw)) for sw, sh in sizes]
    aspect_v = w / sum(h_v)
    if abs(math.log(aspect_h)) <= abs(math.log(aspect_v)):
        canvas = Image.new("RGB", (sum(w_h), h))
        x = 0
        for im, tw in zip(images, w_h):
            if im.size != (tw, h):
                im = im.resize((tw, h), Image.BICUBIC)
            canvas.paste(im, (x, 0))
            x += tw
    else:
        canvas = Image.new("RGB", (w, sum(h_v)))
        y = 0
        for im, th in zip(images, h_v):
            if im.size != (w, th):
                im = im.resize((w, th), Image.BICUBIC)
            canvas.paste(im, (0, y))
            y += th
    return canvas


def expand_to_square(img: Image.Image, color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Returns the image pasted centred on a square canvas of `color` (LLaVA expand2square)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_shortest_edge(img: Image.Image, size: int) -> Image.Image:
    """Returns the image resized (PIL bicubic) so its shortest side is `size` (HF rounding)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img.resize((new_w, new_h), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Returns the central size x size crop (HF numpy centre-crop offsets)."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"center_crop: image {w}x{h} smaller than {size}")
    top, left = (h - size) // 2, (w - size) // 2
    return img.crop((left, top, left + size, top + size))


def normalize(rgb: np.ndarray) -> np.ndarray:
    """Returns CLIP-normalised float32 [3, H, W] from uint8 [H, W, 3]."""
    out = np.empty((3,) + rgb.shape[:2], dtype=np.float32)
    for c in range(3):
        np.take(_LUT[c], rgb[:, :, c], out=out[c])
    return out


def preprocess_image(img: Image.Image, size: int = 336, mode: str = "square") -> np.ndarray:
    """Returns the model input [3, size, size] float32 for an RGB image (`square` or `pad` mode)."""
    if mode not in IMAGE_MODES:
        raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {mode!r}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    if mode == "pad":
        img = expand_to_square(img)
    img = center_crop(resize_shortest_edge(img, size), size)
    return normalize(np.asarray(img))


def load_and_preprocess(
    sources: Sequence[ImageSource],
    names: Sequence[str] | None = None,
    *,
    size: int = 336,
    mode: str = "square",
    composite: bool = True,
    composite_max: int = 4,
    dicom_percentiles: Sequence[float] = (0.5, 99.5),
    draft_size: int | None = None,
) -> np.ndarray:
    """Returns [n, 3, size, size] float32 for a sample's images (n = 1 when composited)."""
    if len(sources) > composite_max:
        raise DataError("too_many_images", f"{len(sources)} images > composite_max={composite_max}")
    names = list(names) if names is not None else [None] * len(sources)
    imgs = [
        load_image(s, n, dicom_percentiles=dicom_percentiles, draft_size=draft_size) for s, n in zip(sources, names)
    ]
    if composite and len(imgs) > 1:
        imgs = [composite_images(imgs, composite_max)]
    if not imgs:
        return np.zeros((0, 3, size, size), np.float32)
    return np.stack([preprocess_image(im, size, mode) for im in imgs])
