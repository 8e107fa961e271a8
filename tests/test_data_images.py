"""Images: CLIP preprocessing parity, colour modes, bad files, DICOM, composites."""

import numpy as np
import pytest
from PIL import Image

from qilin_jax.data import DataError
from qilin_jax.data import images as im
from tests.data_fixtures import random_image, save_image


@pytest.fixture(scope="module")
def clip_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # The release's processor: openai/clip-vit-large-patch14-336 preprocessor_config.
    return CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


@pytest.mark.parametrize("w,h", [(500, 375), (337, 900), (336, 336), (100, 60), (1023, 1024)])
def test_square_and_pad_match_clip_image_processor(clip_processor, w, h):
    img = random_image(w, h, seed=w + h)
    ref = clip_processor(img, return_tensors="np")["pixel_values"][0]
    out = im.preprocess_image(img, 336, "square")
    assert out.shape == (3, 336, 336) and out.dtype == np.float32
    assert np.abs(out - ref).max() <= 1e-5
    # pad: LLaVA's expand2square with the CLIP mean colour, then the same processor.
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (122, 116, 104))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    ref_pad = clip_processor(canvas, return_tensors="np")["pixel_values"][0]
    assert np.abs(im.preprocess_image(img, 336, "pad") - ref_pad).max() <= 1e-5


def test_pad_mode_fills_with_mean_colour_which_normalises_to_about_zero():
    img = Image.new("RGB", (200, 50), (255, 255, 255))
    out = im.preprocess_image(img, 56, "pad")
    # Top rows are canvas (mean colour): (122/255 - mean)/std is ~0; the middle is white (>1.7).
    assert np.abs(out[:, 0, :]).max() < 0.02
    assert out[:, 28, 28].min() > 1.7
    assert im.PAD_COLOR == (122, 116, 104)


def test_colour_modes_become_rgb(tmp_path):
    gray = random_image(40, 30, seed=1, mode="L")
    out = im.load_image(gray)
    a = np.asarray(out)
    assert out.mode == "RGB" and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    rgba = random_image(40, 30, seed=2).convert("RGBA")
    p = tmp_path / "x.png"
    rgba.save(p)
    out = im.load_image(str(p))
    # The release's Image.convert("RGB"): alpha dropped, colours kept.
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(rgba)[..., :3])
    # 16-bit grayscale PNG: min-max scaled to 8 bits instead of clipped.
    arr16 = (np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 31).astype(np.uint16)
    p16 = tmp_path / "g16.png"
    Image.fromarray(arr16).save(p16)
    out = np.asarray(im.load_image(str(p16)))
    assert out.dtype == np.uint8 and out[..., 0].min() == 0 and out[..., 0].max() == 255
    pal = random_image(20, 20, seed=3).convert("P")
    assert im.load_image(pal).mode == "RGB"


def test_bad_image_files(tmp_path):
    good = save_image(tmp_path / "good.jpg", 120, 90)
    data = open(good, "rb").read()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {
        "trunc.jpg": "corrupt_image",
        "junk.jpg": "corrupt_image",
        "empty.png": "corrupt_image",
        "nope.jpg": "missing_image",
    }
    for name, reason in cases.items():
        with pytest.raises(DataError) as e:
            im.load_image(str(tmp_path / name))
        assert e.value.reason == reason
        assert name in str(e.value)
    assert im.load_image(good).size == (120, 90)
    assert im.load_image(data, "bytes.jpg").size == (120, 90)


# ---------------------------------------------------------------------------------- DICOM


def _dcm(name):
    from pydicom.data import get_testdata_file

    return get_testdata_file(name)


def test_dicom_mr_uses_file_window():
    import pydicom

    path = _dcm("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    out = np.asarray(im.load_image(path))
    assert out.shape == (64, 64, 3)
    x = ds.pixel_array.astype(np.float64)  # no rescale tags in this file
    expect = np.clip(((x - 599.5) / 1599 + 0.5) * 255, 0, 255).round().astype(np.uint8)
    assert np.array_equal(out[..., 0], expect)


def test_dicom_ct_rescale_and_percentile_default():
    import pydicom

    path = _dcm("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and float(ds.RescaleIntercept) == -1024
    out = np.asarray(im.load_image(path))[..., 0].astype(np.float64)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = np.percentile(hu, [0.5, 99.5])
    expect = np.clip((hu - lo) / (hi - lo) * 255, 0, 255).round()
    assert np.array_equal(out, expect)
    assert out.min() == 0 and out.max() == 255


def test_dicom_monochrome1_inverted_and_multiframe_middle(tmp_path):
    import pydicom

    ds = pydicom.dcmread(_dcm("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    p = tmp_path / "mono1.dcm"
    ds.save_as(p)
    normal = np.asarray(im.load_image(_dcm("MR_small.dcm")))
    inverted = np.asarray(im.load_image(str(p)))
    assert np.array_equal(inverted, 255 - normal)

    rt = _dcm("rtdose.dcm")  # 15 frames, no window tags: percentile window of the middle frame
    frames = pydicom.dcmread(rt).pixel_array.astype(np.float64)
    assert frames.shape[0] == 15
    out = np.asarray(im.load_image(rt))[..., 0]
    lo, hi = np.percentile(frames[7], [0.5, 99.5])
    expect = np.clip((frames[7] - lo) / (hi - lo) * 255, 0, 255).round()
    assert np.array_equal(out, expect)
    lo0, hi0 = np.percentile(frames[0], [0.5, 99.5])
    assert not np.array_equal(out, np.clip((frames[0] - lo0) / (hi0 - lo0) * 255, 0, 255).round())


def test_dicom_truncated_is_corrupt_and_dicom_goes_through_preprocess():
    with pytest.raises(DataError) as e:
        im.load_image(_dcm("MR_truncated.dcm"))
    assert e.value.reason == "corrupt_image" and "MR_truncated.dcm" in str(e.value)
    data = open(_dcm("CT_small.dcm"), "rb").read()
    assert im.is_dicom(data)
    out = im.load_and_preprocess([data], ["scan.dcm"], size=56, mode="square")
    assert out.shape == (1, 3, 56, 56)
    assert np.allclose(
        out[0, 0], (out[0, 1] * im.CLIP_STD[1] + im.CLIP_MEAN[1] - im.CLIP_MEAN[0]) / im.CLIP_STD[0], atol=1e-5
    )


# ---------------------------------------------------------------------------------- composites


def test_composite_direction_keeps_aspect_near_one():
    wide = [Image.new("RGB", (300, 100), c) for c in ("red", "green")]
    out = im.composite_images(wide)
    assert out.size == (300, 200)  # stacked: 3:2 instead of 6:1 side by side
    assert out.getpixel((150, 50)) == (255, 0, 0) and out.getpixel((150, 150))[1] > 100
    tall = [Image.new("RGB", (100, 300), c) for c in ("red", "green", "blue")]
    out = im.composite_images(tall)
    assert out.size == (300, 300)
    assert out.getpixel((50, 10)) == (255, 0, 0) and out.getpixel((250, 10)) == (0, 0, 255)


def test_composite_scales_to_the_smallest_side():
    a = Image.new("RGB", (100, 200), "red")
    b = Image.new("RGB", (50, 100), "blue")
    out = im.composite_images([a, b])
    # horizontal: common height 100 -> a becomes 50x100: 100x100 (aspect 1) beats 50x300.
    assert out.size == (100, 100)
    assert out.getpixel((10, 50)) == (255, 0, 0) and out.getpixel((90, 50)) == (0, 0, 255)


def test_too_many_images_and_composite_shapes():
    imgs = [random_image(40 + i, 30, seed=i) for i in range(5)]
    with pytest.raises(DataError) as e:
        im.composite_images(imgs, 4)
    assert e.value.reason == "too_many_images"
    with pytest.raises(DataError):
        im.load_and_preprocess(imgs, size=28)
    assert im.load_and_preprocess(imgs[:3], size=28).shape == (1, 3, 28, 28)
    assert im.load_and_preprocess(imgs[:3], size=28, composite=False).shape == (3, 3, 28, 28)
    assert im.load_and_preprocess([], size=28).shape == (0, 3, 28, 28)
