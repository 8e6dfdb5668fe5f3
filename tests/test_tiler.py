"""Tests for the resolution-aware tiler (vlm/data/tiler.py): decoding, colour modes, cap, grid, tiles, guards, CLI."""

import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from images import crafted_png
from PIL import Image, ImageFile, JpegImagePlugin

from vlm.cli import compose_config
from vlm.config import TilerConfig, load_config
from vlm.data import synthetic
from vlm.data import tiler as tiler_mod
from vlm.data.tiler import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageLoadError,
    Tiler,
    main,
    select_grid,
)

REPO = Path(__file__).resolve().parents[1]


def make_tiler(max_tiles: int = 1, tile_size: int = 16, tokens_per_tile: int = 4, **config) -> Tiler:
    return Tiler(TilerConfig(max_tiles=max_tiles, **config), tile_size=tile_size, tokens_per_tile=tokens_per_tile)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def pixel(tiler: Tiler, tiled, tile: int = 0, xy: tuple[int, int] | None = None) -> tuple[int, ...]:
    """De-normalised RGB at xy (default: centre) of one tile."""
    im = tiler.to_images(tiled)[tile]
    return im.getpixel(xy or (im.width // 2, im.height // 2))


def close(a, b, tol: int = 2) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- colour modes, EXIF, animation


BG = (10, 20, 30)


def _palette_image(transparent: bool) -> Image.Image:
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 200, 50, 25] + [0] * (254 * 3))
    if transparent:
        im.info["transparency"] = 1
    return im


MODE_CASES = {
    # name: (image, expected RGB at the centre)
    "L": (lambda: Image.new("L", (8, 8), 100), (100, 100, 100)),
    "LA-opaque": (lambda: Image.new("LA", (8, 8), (100, 255)), (100, 100, 100)),
    "LA-transparent": (lambda: Image.new("LA", (8, 8), (100, 0)), BG),
    "P": (lambda: _palette_image(False), (200, 50, 25)),
    "P-transparency": (lambda: _palette_image(True), BG),
    "RGBA-transparent": (lambda: Image.new("RGBA", (8, 8), (200, 100, 50, 0)), BG),
    "RGBA-half": (lambda: Image.new("RGBA", (8, 8), (210, 120, 50, 128)), (110, 70, 40)),
    "RGBA-opaque": (lambda: Image.new("RGBA", (8, 8), (200, 100, 50, 255)), (200, 100, 50)),
    "CMYK": (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
    "I;16-max": (lambda: Image.new("I;16", (8, 8), 65535), (255, 255, 255)),
    "I;16-mid": (lambda: Image.new("I;16", (8, 8), 32896), (128, 128, 128)),
    "I": (lambda: Image.new("I", (8, 8), 65535), (255, 255, 255)),
    "1": (lambda: Image.new("1", (8, 8), 1), (255, 255, 255)),
    "RGB": (lambda: Image.new("RGB", (8, 8), (1, 2, 3)), (1, 2, 3)),
}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
@pytest.mark.parametrize("via", ["pil", "file"])
def test_colour_modes_convert_to_rgb(case, via, tmp_path):
    make, expected = MODE_CASES[case]
    im = make()
    tiler = make_tiler(background=BG)
    if via == "file":
        path = tmp_path / f"img.{'tiff' if im.mode in ('CMYK', 'I') else 'png'}"
        im.save(path)
        with Image.open(path) as check:  # the file really holds the mode under test
            assert check.mode == im.mode
        tiled = tiler(path)
    else:
        tiled = tiler(im)
    assert tiled.pixel_values.shape == (1, 3, 16, 16)
    assert close(pixel(tiler, tiled), expected), (case, pixel(tiler, tiled), expected)


def test_cmyk_jpeg_and_rgb_png_transparency(tmp_path):
    tiler = make_tiler(background=BG)
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert close(pixel(tiler, tiler(tmp_path / "cmyk.jpg")), (255, 0, 0), tol=6)
    rgb = Image.new("RGB", (8, 8), (7, 8, 9))
    rgb.save(tmp_path / "trns.png", transparency=(7, 8, 9))  # RGB PNG with a tRNS colour key
    assert close(pixel(tiler, tiler(tmp_path / "trns.png")), BG)


def _two_colour(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    im = Image.new("RGB", (width, height), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, width // 2, height))
    return im


@pytest.mark.parametrize("size", [(40, 20), (2400, 1200)])  # the big one goes through the JPEG draft path
def test_exif_orientation_applied(size, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display: stored left -> top
    path = tmp_path / "rotated.jpg"
    _two_colour(*size).save(path, exif=exif, quality=95)
    tiler = make_tiler(tile_size=32)
    tiled = tiler(path)
    w, h = size
    assert tiled.original_size == (h, w)
    assert tiled.num_tokens == tiler.num_tokens_for(h, w)
    # displayed portrait image, fitted into 32x32 at 16x32: top is red, bottom is blue
    assert close(pixel(tiler, tiled, xy=(16, 4)), (255, 0, 0), tol=12)
    assert close(pixel(tiler, tiled, xy=(16, 28)), (0, 0, 255), tol=12)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    tiler = make_tiler()
    assert close(pixel(tiler, tiler(path)), (255, 0, 0))
    assert close(pixel(tiler, tiler(path.read_bytes())), (255, 0, 0))


# ---------------------------------------------------------------- cap and extreme sizes


@pytest.mark.parametrize(
    ("size", "capped"),
    [
        ((12000, 8000), (6144, 4096)),
        ((8000, 12000), (4096, 6144)),
        ((10000, 10000), (4096, 4096)),
        ((6144, 4096), (6144, 4096)),
        ((7000, 1000), (6144, 878)),
        ((640, 480), (640, 480)),  # never upscaled
        ((16, 16), (16, 16)),
        ((1, 10000), (1, 6144)),
        ((10000, 1), (6144, 1)),
    ],
)
def test_cap(size, capped):
    assert make_tiler(max_tiles=12, tile_size=336).plan(*size)[0] == capped


def test_cap_on_decoded_image_and_smaller_config_caps():
    tiler = make_tiler(max_tiles=4, tile_size=32, max_long_side=100, max_short_side=50)
    tiled = tiler(Image.new("RGB", (300, 120), (9, 9, 9)))
    assert tiled.original_size == (300, 120)
    assert tiled.capped_size == (100, 40)
    small = tiler(Image.new("RGB", (20, 10)))
    assert small.capped_size == small.original_size == (20, 10)


@pytest.mark.parametrize("size", [(1, 10000), (10000, 1), (1, 1), (2, 7000), (3, 1)])
def test_extreme_aspect_ratios_give_valid_tiles(size):
    tiler = make_tiler(max_tiles=12, tile_size=32)
    tiled = tiler(Image.new("RGB", size, (200, 30, 30)))
    rows, cols = tiled.grid
    n = rows * cols + (rows * cols > 1)
    assert tiled.pixel_values.shape == (n, 3, 32, 32)
    assert torch.isfinite(tiled.pixel_values).all()
    assert rows * cols <= 12
    if size[0] == 1 and size[1] > 1000:  # a tall line uses a tall grid, not one squashed tile
        assert tiled.grid == (12, 1)


# ---------------------------------------------------------------- grid selection vs LLaVA-NeXT


def _score(width: int, height: int, canvas_w: int, canvas_h: int) -> tuple[int, int]:
    return tiler_mod._fit_score(width, height, canvas_w, canvas_h)


SIZES = [
    (w, h)
    for w in (1, 16, 100, 224, 336, 500, 640, 1000, 1344, 2000, 4096, 6144)
    for h in (1, 50, 336, 480, 1000, 3000)
]


@pytest.mark.parametrize("max_tiles", [1, 2, 4, 6, 9, 12])
@pytest.mark.parametrize("tile_size", [224, 336])
def test_grid_matches_or_beats_llava_next(max_tiles, tile_size):
    from transformers.image_processing_utils import select_best_resolution

    pinpoints = [(r * tile_size, c * tile_size) for r in range(1, max_tiles + 1) for c in range(1, max_tiles // r + 1)]
    for w, h in SIZES:
        rows, cols = select_grid(w, h, tile_size, max_tiles)
        hf_h, hf_w = select_best_resolution((h, w), pinpoints)
        ours = _score(w, h, cols * tile_size, rows * tile_size)
        theirs = _score(w, h, hf_w, hf_h)
        # more effective pixels, or as many with no more padding
        assert (ours[0], -ours[1]) >= (theirs[0], -theirs[1]), (w, h)
        hf_degenerate = any(
            int(w * min(pw / w, ph / h)) == 0 or int(h * min(pw / w, ph / h)) == 0 for ph, pw in pinpoints
        )
        if not hf_degenerate:  # transformers scores a 0-pixel side as 0; elsewhere we agree exactly
            assert (rows * tile_size, cols * tile_size) == (hf_h, hf_w), (w, h)


def test_small_image_is_one_tile():
    tiler = make_tiler(max_tiles=12, tile_size=336)
    for size in [(16, 16), (336, 336), (100, 300), (336, 200)]:
        assert tiler.plan(*size)[1] == (1, 1)


# ---------------------------------------------------------------- tiles: order, thumbnail, normalisation

QUADRANTS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))


def _quadrant_image(size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size))
    half = size // 2
    for i, colour in enumerate(QUADRANTS):  # row-major: TL, TR, BL, BR
        r, c = divmod(i, 2)
        im.paste(colour, (c * half, r * half, (c + 1) * half, (r + 1) * half))
    return im


def test_tiles_row_major_and_thumbnail_last():
    tiler = make_tiler(max_tiles=4, tile_size=32)
    tiled = tiler(png_bytes(_quadrant_image()))
    assert tiled.grid == (2, 2)
    assert tiled.pixel_values.shape == (5, 3, 32, 32)
    assert tiled.num_tokens == 5 * 4
    for i, colour in enumerate(QUADRANTS):
        assert close(pixel(tiler, tiled, tile=i), colour)
    thumb = tiler.to_images(tiled)[4]
    for i, colour in enumerate(QUADRANTS):
        r, c = divmod(i, 2)
        assert close(thumb.getpixel((8 + 16 * c, 8 + 16 * r)), colour)


def test_thumbnail_only_when_grid_has_more_than_one_tile():
    one = make_tiler(max_tiles=4, tile_size=32)(Image.new("RGB", (20, 20)))
    assert one.grid == (1, 1) and one.pixel_values.shape[0] == 1
    no_thumb = make_tiler(max_tiles=4, tile_size=32, thumbnail=False)
    tiled = no_thumb(_quadrant_image())
    assert tiled.grid == (2, 2) and tiled.pixel_values.shape[0] == 4 and tiled.num_tokens == 16
    assert no_thumb.num_tokens_for(64, 64) == 16


def test_normalisation_and_mean_padding():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    tiler = Tiler(TilerConfig(max_tiles=1), tile_size=16, tokens_per_tile=1, mean=mean, std=std)
    tiled = tiler(Image.new("RGB", (16, 8), (255, 0, 51)))  # wide: letterboxed 16x8 inside 16x16
    px = tiled.pixel_values[0]
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 51), mean, std, strict=True)]
    assert torch.allclose(px[:, 8, 8], torch.tensor(expected), atol=1e-5)
    assert torch.equal(px[:, 0], torch.zeros(3, 16))  # padding is the mean colour: 0 after normalisation
    assert torch.equal(px[:, 15], torch.zeros(3, 16))
    assert px.dtype == torch.float32
    default = make_tiler()(Image.new("RGB", (4, 4), (0, 0, 0)))
    assert torch.allclose(
        default.pixel_values[0, :, 8, 8], -torch.tensor(OPENAI_CLIP_MEAN) / torch.tensor(OPENAI_CLIP_STD), atol=1e-5
    )


# ---------------------------------------------------------------- JPEG draft decoding


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "photo_6144x4096.jpg"
    synthetic.photo(6144, 4096).save(path, quality=90)
    return path


def test_draft_decode_matches_full_decode(big_jpeg, monkeypatch):
    scales = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        scales.append(self.decoderconfig[0])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = Tiler(TilerConfig(max_tiles=12), tile_size=336, tokens_per_tile=576)(big_jpeg)
    assert scales == [4]  # 1536x1024 decoded for a 1344x896 grid image, not 6144x4096
    full = Tiler(TilerConfig(max_tiles=12, draft=False), tile_size=336, tokens_per_tile=576)(big_jpeg)
    assert scales == [4]  # the full path does not draft
    assert fast.grid == full.grid == (3, 4) and fast.capped_size == (6144, 4096)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1) * 255  # back to 0..255 pixel units
    mse = (((fast.pixel_values - full.pixel_values) * std) ** 2).mean().item()
    psnr = 10 * np.log10(255**2 / mse)
    assert psnr >= 30, psnr


# ---------------------------------------------------------------- bombs and bad input


def _no_decode(monkeypatch):
    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_bomb_refused_from_header(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(crafted_png(20000, 20000))  # 400 MP > 256 MP
    _no_decode(monkeypatch)
    tiler = make_tiler()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(ImageLoadError) as err:
            tiler(path)
    assert not shown, [str(w.message) for w in shown]  # PIL warns between our limit and twice it: ours alone is shown
    msg = str(err.value)
    assert str(path) in msg and "20000x20000" in msg and "256,000,000" in msg
    # far past PIL's own hard limit as well: still our error type, naming the pixels and the limit
    with pytest.raises(ImageLoadError, match=r"10,000,000,000 pixels.*256,000,000") as err:
        tiler(crafted_png(100000, 100000), name="shard-7/key-3")
    assert "shard-7/key-3" in str(err.value)


def test_small_max_pixels_refuses_normal_image(tmp_path, monkeypatch):
    path = tmp_path / "ok.png"
    Image.new("RGB", (100, 50)).save(path)
    _no_decode(monkeypatch)
    with pytest.raises(ImageLoadError, match=r"100x50 \(5,000 pixels\).*limit of 1,000 pixels"):
        make_tiler(max_pixels=1000)(path)
    with pytest.raises(ImageLoadError, match="1,000"):
        make_tiler(max_pixels=1000)(Image.new("RGB", (100, 50)))


def test_pil_global_guard_is_relaxed_only_while_we_read(tmp_path, monkeypatch):
    # Stand-in for a 96 MP photo: make PIL's own guard tiny, so this 200x200 image is a "bomb" to PIL.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 200), (1, 2, 3)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        tiled = make_tiler()(path)
    assert tiled.original_size == (200, 200)
    assert Image.MAX_IMAGE_PIXELS == 10_000  # restored
    with pytest.raises(Image.DecompressionBombError):  # other code keeps PIL's safety
        Image.open(path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_names_the_source(fmt, tmp_path):
    data = io.BytesIO()
    synthetic.photo(400, 300).save(data, format=fmt)
    cut = data.getvalue()[: len(data.getvalue()) // 2]
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(cut)
    tiler = make_tiler(max_tiles=4, tile_size=32)
    with pytest.raises(ImageLoadError, match=str(path)):
        tiler(path)
    with pytest.raises(ImageLoadError, match="shard-000/0042"):
        tiler(cut, name="shard-000/0042")
    with pytest.raises(ImageLoadError, match="cut"):
        tiler(data.getvalue()[:20], name="cut-header")


@pytest.mark.timeout(30)
def test_empty_and_non_image_input(tmp_path):
    tiler = make_tiler()
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=rf"{empty}.*0 bytes"):
        tiler(empty)
    with pytest.raises(ImageLoadError, match="key-9"):
        tiler(b"", name="key-9")
    text = tmp_path / "notes.png"
    text.write_bytes(b"this is not an image\n" * 10)
    with pytest.raises(ImageLoadError, match=str(text)):
        tiler(text)
    with pytest.raises(ImageLoadError, match="blob"):
        tiler(b"<html>nope</html>", name="blob")
    with pytest.raises(ImageLoadError, match="missing.png"):
        tiler(tmp_path / "missing.png")
    assert issubclass(ImageLoadError, ValueError)


# ---------------------------------------------------------------- config validation and tier presets


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_tiles", 0),
        ("max_tiles", 2.5),
        ("max_long_side", 8000),
        ("max_long_side", 0),
        ("max_short_side", 4097),
        ("max_pixels", 0),
        ("thumbnail", "yes"),
        ("background", (300, 0, 0)),
        ("background", (1, 2)),
    ],
)
def test_config_validation_names_key_and_value(key, value):
    with pytest.raises(ValueError, match=rf"tiler\.{key}") as err:
        TilerConfig(**{key: value})
    assert repr(value) in str(err.value)


def test_tiler_validation():
    with pytest.raises(ValueError, match="tile_size"):
        Tiler(TilerConfig(), tile_size=0, tokens_per_tile=1)
    with pytest.raises(ValueError, match="tokens_per_tile"):
        Tiler(TilerConfig(), tile_size=16, tokens_per_tile=-1)
    with pytest.raises(ValueError, match="std"):
        Tiler(TilerConfig(), tile_size=16, tokens_per_tile=1, std=(0.0, 1.0, 1.0))


@pytest.mark.parametrize(("tier", "max_tiles"), [("low", 1), ("mid", 4), ("high", 12)])
def test_tier_presets(tier, max_tiles):
    config = load_config(TilerConfig, compose_config("train", [f"tiler={tier}"]).tiler)
    assert config.max_tiles == max_tiles
    assert (config.max_long_side, config.max_short_side) == (6144, 4096)
    assert config == TilerConfig(max_tiles=max_tiles)  # every other value is the default


# ---------------------------------------------------------------- properties


@settings(max_examples=50, deadline=None)
@given(
    width=st.one_of(st.integers(1, 60000), st.sampled_from([1, 2, 6144, 6145, 4096, 4097])),
    height=st.one_of(st.integers(1, 60000), st.sampled_from([1, 2, 6144, 6145, 4096, 4097])),
    max_tiles=st.integers(1, 16),
    tile_size=st.sampled_from([14, 224, 336, 448]),
)
def test_plan_properties(width, height, max_tiles, tile_size):
    tiler = make_tiler(max_tiles=max_tiles, tile_size=tile_size, tokens_per_tile=7)
    (cw, ch), (rows, cols) = tiler.plan(width, height)
    assert max(cw, ch) <= 6144 and min(cw, ch) <= 4096
    assert 1 <= cw <= width and 1 <= ch <= height  # never upscaled, never empty
    if cw > 1 and ch > 1:  # aspect ratio kept (to within rounding)
        assert abs(cw / ch - width / height) <= (width / height) * (1 / min(cw, ch)) + 1e-9
    assert 1 <= rows * cols <= max_tiles
    n = rows * cols + (rows * cols > 1)
    assert tiler.num_tokens_for(width, height) == 7 * n


@pytest.fixture(scope="module")
def tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        num_classes=0,
    )
    return model.eval()


@settings(max_examples=50, deadline=None)
@given(width=st.integers(1, 300), height=st.integers(1, 300), max_tiles=st.integers(1, 6), seed=st.integers(0, 9))
def test_tiles_properties_and_token_count_matches_vit(tiny_vit, width, height, max_tiles, seed):
    s, patch = 32, 8
    tokens_per_tile = (s // patch) ** 2
    tiler = Tiler(TilerConfig(max_tiles=max_tiles), tile_size=s, tokens_per_tile=tokens_per_tile)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    tiled = tiler(Image.fromarray(pixels))
    n = tiled.pixel_values.shape[0]
    rows, cols = tiled.grid
    assert tiled.pixel_values.shape == (n, 3, s, s)
    assert n == rows * cols + (rows * cols > 1) <= max_tiles + 1
    assert torch.isfinite(tiled.pixel_values).all()
    assert (tiled.capped_size, tiled.grid) == tiler.plan(width, height)
    assert tiled.num_tokens == n * tokens_per_tile == tiler.num_tokens_for(width, height)
    with torch.no_grad():
        features = tiny_vit.forward_features(tiled.pixel_values)  # (N, prefix + patches, D)
    assert features.shape[0] * (features.shape[1] - tiny_vit.num_prefix_tokens) == tiled.num_tokens


# ---------------------------------------------------------------- CLI


def test_cli_prints_plan_and_saves_tiles(tmp_path, capsys):
    path = tmp_path / "photo.png"
    synthetic.photo(640, 480).save(path)
    out_dir = tmp_path / "tiles"
    assert (
        main([str(path), "--tile-size", "64", "--max-tiles", "6", "--tokens-per-tile", "16", "--save", str(out_dir)])
        == 0
    )
    out = capsys.readouterr().out
    rows, cols = select_grid(640, 480, 64, 6)
    n = rows * cols + 1
    assert f"grid:           {rows}x{cols}" in out and "640x480" in out
    assert f"image tokens:   {n * 16}" in out
    saved = sorted(out_dir.glob("*.png"))
    assert len(saved) == n and saved[-1].name.endswith("thumbnail.png")
    assert Image.open(saved[0]).size == (64, 64)
    square = tmp_path / "square.png"  # a second image into the same folder: only its own tiles are there
    synthetic.photo(64, 64).save(square)
    assert main([str(square), "--tile-size", "64", "--max-tiles", "6", "--save", str(out_dir)]) == 0
    assert [p.name for p in sorted(out_dir.glob("*.png"))] == ["tile_00_r0c0.png"]


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--tile-size", "--max-tiles", "--tokens-per-tile"])
def test_cli_bad_counts_are_named_by_their_flag(flag, capsys):
    from vlm.data.tiler import main

    with pytest.raises(SystemExit) as stop:
        main(["any.png", flag, "0"])
    assert stop.value.code == 2 and capsys.readouterr().err.endswith(f"error: {flag} must be at least 1, got 0\n")


@pytest.mark.slow  # end to end (a run, a pipeline or a process of its own): the full suite runs it
def test_cli_bad_path_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vlm.data.tiler", str(tmp_path / "nope.jpg")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert "nope.jpg" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--max-tiles" in capsys.readouterr().out
