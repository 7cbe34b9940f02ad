"""Issue 20, Deliver 5: every image decodes to what a viewer shows, or is refused naming the file.

One test per PIL mode / sample format; the files are made here with PIL, tifffile and numpy.
On 90df1cd a float TIFF in 0..1 decoded to all zeros (black), signed and out-of-range images
were silently clipped, and partly transparent images lost their alpha without a word.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageCms
from typer.testing import CliRunner

from gi_core.datasets import decode_image_file, load_images
from gi_core.errors import ConfigError
from pipelines.cli import app

RNG = np.random.default_rng(0)
GRAY = RNG.random((12, 10))  # (H, W) in [0, 1)
RGB = RNG.random((12, 10, 3))


def chw(array: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, 3) in [0, 1] -> (3, H, W) float32, the expected decode."""
    t = torch.from_numpy(np.asarray(array, dtype=np.float64)).float()
    return (t.unsqueeze(0).expand(3, -1, -1) if t.dim() == 2 else t.permute(2, 0, 1)).contiguous()


def assert_decodes_to(path: Path, expected: torch.Tensor, atol: float = 1e-6) -> None:
    decoded = decode_image_file(path)
    assert decoded.dtype == torch.float32 and decoded.shape == expected.shape
    assert torch.allclose(decoded, expected, atol=atol), (decoded - expected).abs().max()


def assert_refused(path: Path, *words: str) -> None:
    with pytest.raises(ConfigError) as info:
        decode_image_file(path)
    message = str(info.value)
    assert str(path) in message and "convert it to" in message, message
    assert all(w in message for w in words), message


# ---- accepted modes, scaled to what a viewer shows -------------------------------------------


def test_float32_tiff_in_unit_range_keeps_its_values(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, GRAY.astype(np.float32))
    assert Image.open(path).mode == "F"
    assert_decodes_to(path, chw(GRAY.astype(np.float32)))  # 90df1cd: all zeros


def test_float_rgb_and_float64_tiffs_pillow_cannot_open_decode(tmp_path: Path) -> None:
    rgb, f64 = tmp_path / "rgb.tif", tmp_path / "f64.tif"
    tifffile.imwrite(rgb, RGB.astype(np.float32), photometric="rgb")
    tifffile.imwrite(f64, GRAY)
    assert_decodes_to(rgb, chw(RGB.astype(np.float32)))
    assert_decodes_to(f64, chw(GRAY))


def test_sixteen_bit_tiff_and_png_are_scaled_by_65535(tmp_path: Path) -> None:
    values = (GRAY * 65535).astype(np.uint16)
    tif, png = tmp_path / "u16.tif", tmp_path / "u16.png"
    tifffile.imwrite(tif, values)
    Image.fromarray(values).save(png)
    for path in (tif, png):
        assert Image.open(path).mode.startswith("I")
        assert_decodes_to(path, chw(values / 65535.0))


def test_unsigned_32_bit_tiff_is_scaled_by_its_full_range(tmp_path: Path) -> None:
    values = (GRAY * (2**32 - 1)).astype(np.uint32)
    path = tmp_path / "u32.tif"
    tifffile.imwrite(path, values)
    assert Image.open(path).mode == "I"
    assert_decodes_to(path, chw(values / (2**32 - 1)))


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGB"])
def test_eight_bit_gray_bilevel_palette_and_rgb(tmp_path: Path, mode: str) -> None:
    rgb8 = (RGB * 255).astype(np.uint8)
    image = Image.fromarray(rgb8).convert(mode)
    path = tmp_path / f"{mode}.png"
    image.save(path)
    expected = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    assert_decodes_to(path, chw(expected))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_opaque_alpha_is_dropped(tmp_path: Path, mode: str) -> None:
    rgb8 = (RGB * 255).astype(np.uint8)
    image = Image.fromarray(rgb8).convert(mode)
    path = tmp_path / f"{mode}.png" if mode != "PA" else tmp_path / "pa.tif"
    image.save(path)
    expected = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    assert_decodes_to(path, chw(expected))


def test_cmyk_decodes_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.tif"
    Image.new("CMYK", (6, 4), (255, 0, 0, 0)).save(path)  # pure cyan
    assert_decodes_to(path, chw(np.broadcast_to([0.0, 1.0, 1.0], (4, 6, 3))))


def test_cmyk_with_an_icc_profile_goes_through_it(tmp_path: Path) -> None:
    # An sRGB-like profile is enough to prove the profile path runs without raising; the
    # plain conversion is the fallback a viewer without colour management shows.
    path = tmp_path / "cmyk-icc.jpg"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("CMYK", (6, 4), (0, 0, 0, 0)).save(path, icc_profile=icc)
    decoded = decode_image_file(path)
    assert decoded.shape == (3, 4, 6) and float(decoded.min()) >= 0.9  # white paper stays white


def test_ycbcr_jpeg_decodes_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "ycc.tif"
    Image.new("RGB", (6, 4), (200, 30, 90)).convert("YCbCr").save(path)
    decoded = decode_image_file(path)
    assert torch.allclose(decoded[:, 0, 0], torch.tensor([200, 30, 90]) / 255.0, atol=3 / 255)


# ---- refused modes: exit 2 naming the file ---------------------------------------------------


def test_float_outside_unit_range_and_nan_are_refused(tmp_path: Path) -> None:
    wide, nan = tmp_path / "wide.tif", tmp_path / "nan.tif"
    tifffile.imwrite(wide, (GRAY * 255).astype(np.float32))
    tifffile.imwrite(nan, np.where(GRAY > 0.5, np.nan, GRAY).astype(np.float32))
    assert_refused(wide, "float image", "0..1")
    assert_refused(nan, "NaN")


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
def test_signed_integer_tiffs_are_refused(tmp_path: Path, dtype: type) -> None:
    path = tmp_path / f"{np.dtype(dtype).name}.tif"
    tifffile.imwrite(path, (GRAY * 100).astype(dtype))
    assert_refused(path, "signed integers")  # int8 opens as "L": 90df1cd read it as unsigned


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_partly_transparent_images_are_refused(tmp_path: Path, mode: str) -> None:
    rgba = np.concatenate([(RGB * 255).astype(np.uint8), np.full((12, 10, 1), 255, np.uint8)], -1)
    rgba[0, 0, 3] = 0
    path = tmp_path / f"{mode}.png"
    Image.fromarray(rgba).convert(mode).save(path)
    assert_refused(path, "transparent")


def test_palette_with_a_transparent_colour_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.gif"
    image = Image.fromarray((RGB * 255).astype(np.uint8)).convert("P")
    image.save(path, transparency=int(np.asarray(image)[0, 0]))
    assert_refused(path, "transparent")


def test_lab_colour_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lab.tif"
    Image.new("LAB", (6, 4), (50, 128, 128)).save(path)
    assert_refused(path, "'LAB'")


def test_four_channel_float_tiff_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cmykf.tif"
    tifffile.imwrite(path, RNG.random((4, 5, 4)).astype(np.float32), photometric="separated")
    assert_refused(path, "TIFF of shape")


# ---- through the data set and the CLI ---------------------------------------------------------


def _float_folder(tmp_path: Path, scale: float) -> Path:
    root = tmp_path / "imgs"
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(2):
            image = np.roll(RNG.random((40, 40)), 5 * k, axis=0) * scale
            tifffile.imwrite(root / f"class{c}" / f"{k}.tif", image.astype(np.float32))
    return root


def test_float_tiff_folder_loads_images_that_are_not_black(tmp_path: Path) -> None:
    root = _float_folder(tmp_path, 1.0)
    images, _ = load_images(f"imagefolder:{root}", [0, 1, 2, 3], image_size=32)
    assert images.shape == (4, 3, 32, 32)
    assert float(images.mean()) == pytest.approx(0.5, abs=0.05)  # 90df1cd: 0.0


def test_plan_refuses_a_float_tiff_outside_unit_range_naming_it(tmp_path: Path) -> None:
    root = _float_folder(tmp_path, 255.0)  # 90df1cd: clipped to white, exit 0
    spec = tmp_path / "grid.yaml"
    spec.write_text(
        f"name: floats\ndata: {{dataset: 'imagefolder:{root}', image_size: 32, "
        "num_batches: 1}\nvictim: {arch: lenet}\nmethods: [gi-x]\nbatch_sizes: [2]\n"
    )
    result = CliRunner().invoke(app, ["plan", str(spec), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert ".tif" in result.output and "float image" in result.output
