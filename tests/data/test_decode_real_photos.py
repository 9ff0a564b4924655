"""Real photos and real depth maps decode to the right pixels (each case on a file made here).

Phone photos carry their rotation in EXIF and are not square; cut-outs have transparency;
scans are grayscale, palette or CMYK; depth sensors write 16-bit millimetres.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search.data.cache import depth_range, load_split_arrays, split_cache_key
from search.data.decode import RESIZE_MODES, decode_image, fit_depth_range
from search.data.index import load_index

RED, GREEN, BLUE = (220, 20, 20), (20, 220, 20), (20, 20, 220)


def save(path: Path, image: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def close(pixel, expected, tolerance: int = 6) -> bool:
    return bool(np.abs(np.asarray(pixel, int) - np.asarray(expected, int)).max() <= tolerance)


def test_exif_orientation_is_applied(tmp_path: Path):
    # Stored 16 wide x 8 high, left half red; orientation 6 shows it rotated 90 degrees
    # clockwise: 8 wide x 16 high, red on top.
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, :8], pixels[:, 8:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path / "phone.jpg", Image.fromarray(pixels), exif=exif, quality=95)
    decoded = decode_image(path, "rgb", 8, resize="squash")
    assert close(decoded[1, 4], RED, 30) and close(decoded[6, 4], BLUE, 30)
    plain = save(tmp_path / "plain.jpg", Image.fromarray(pixels), quality=95)
    unrotated = decode_image(plain, "rgb", 8, resize="squash")
    assert close(unrotated[4, 1], RED, 30) and close(unrotated[4, 6], BLUE, 30)


def test_transparency_is_composited_on_white(tmp_path: Path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = (1, 2, 3, 0)  # fully transparent: its colour channels are not what is seen
    rgba[:, 2:] = (10, 200, 30, 255)
    path = save(tmp_path / "cutout.png", Image.fromarray(rgba, "RGBA"))
    decoded = decode_image(path, "rgb", 4)
    assert tuple(decoded[0, 0]) == (255, 255, 255)
    assert tuple(decoded[0, 3]) == (10, 200, 30)
    half = save(tmp_path / "half.png", Image.new("RGBA", (4, 4), (0, 0, 0, 128)))
    assert close(decode_image(half, "rgb", 4)[0, 0], (127, 127, 127), 1)
    la = save(tmp_path / "la.png", Image.new("LA", (4, 4), (50, 0)))
    assert tuple(decode_image(la, "rgb", 4)[0, 0]) == (255, 255, 255)


def test_palette_grayscale_and_sixteen_bit_grayscale(tmp_path: Path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, *GREEN] + [0] * 762)
    assert tuple(decode_image(save(tmp_path / "p.png", palette), "rgb", 4)[2, 2]) == GREEN
    see_through = palette.copy()
    see_through.info["transparency"] = 1
    decoded = decode_image(save(tmp_path / "pt.png", see_through, transparency=1), "rgb", 4)
    assert tuple(decoded[2, 2]) == (255, 255, 255)
    gray = save(tmp_path / "l.png", Image.new("L", (4, 4), 77))
    assert tuple(decode_image(gray, "rgb", 4)[1, 1]) == (77, 77, 77)
    deep = save(tmp_path / "i16.png", Image.fromarray(np.full((4, 4), 51200, np.uint16)))
    assert Image.open(deep).mode.startswith("I")
    assert tuple(decode_image(deep, "rgb", 4)[1, 1]) == (200, 200, 200)  # 51200 / 256


def test_cmyk_jpeg_decodes_to_rgb(tmp_path: Path):
    path = save(tmp_path / "print.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=95)
    assert Image.open(path).mode == "CMYK"
    assert close(decode_image(path, "rgb", 8)[4, 4], (255, 0, 0), 8)
    cyan = save(tmp_path / "cyan.jpg", Image.new("CMYK", (8, 8), (255, 0, 0, 0)), quality=95)
    assert close(decode_image(cyan, "rgb", 8)[4, 4], (0, 255, 255), 8)


def wide_photo(path: Path) -> Path:
    """16 wide x 8 high: a red quarter, a green half, a blue quarter."""
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, :4], pixels[:, 4:12], pixels[:, 12:] = RED, GREEN, BLUE
    return save(path, Image.fromarray(pixels))


def test_non_square_photos_follow_the_resize_mode(tmp_path: Path):
    path = wide_photo(tmp_path / "wide.png")
    crop = decode_image(path, "rgb", 8, resize="center_crop")
    assert all(tuple(p) == GREEN for p in crop.reshape(-1, 3))  # the central square only
    squash = decode_image(path, "rgb", 8, resize="squash")
    assert tuple(squash[4, 0]) == RED and tuple(squash[4, 7]) == BLUE
    pad = decode_image(path, "rgb", 8, resize="pad")
    assert not pad[:2].any() and not pad[6:].any()  # 8 x 4 content, centred, black around
    assert tuple(pad[3, 0]) == RED and tuple(pad[3, 4]) == GREEN and tuple(pad[4, 7]) == BLUE
    tall = save(tmp_path / "tall.png", Image.fromarray(np.ascontiguousarray(
        np.asarray(Image.open(path)).transpose(1, 0, 2))))
    assert not decode_image(tall, "rgb", 8, resize="pad")[:, :2].any()


def test_square_images_are_the_same_in_every_mode(tmp_path: Path):
    """The demo sets are square: their cache does not depend on the resize mode."""
    rng = np.random.default_rng(0)
    path = save(tmp_path / "square.png", Image.fromarray(rng.integers(0, 256, (24, 24, 3),
                                                                        dtype=np.uint8)))
    decoded = [decode_image(path, "rgb", 16, resize=mode).tobytes() for mode in RESIZE_MODES]
    assert len(set(decoded)) == 1


def depth_set(root: Path, maps: dict[str, dict[str, list[np.ndarray]]]) -> Path:
    """A folders-layout set: split -> class -> depth maps; each rgb a class colour."""
    for split, per_class in maps.items():
        for label, depths in per_class.items():
            for i, depth in enumerate(depths):
                colour = RED if label == "near" else BLUE
                save(root / split / "rgb" / label / f"{label}{i}.png",
                     Image.new("RGB", depth.shape[::-1], colour))
                save(root / split / "depth" / label / f"{label}{i}.png", Image.fromarray(depth))
    return root


def mm(value: float, shape=(8, 8)) -> np.ndarray:
    return np.full(shape, value, np.uint16)


def test_sixteen_bit_depth_keeps_its_precision(spec, tmp_path: Path):
    # Millimetres 1000..1030: their top 8 bits hold one or two levels, so the old rule
    # (value / 256) flattened them; the fitted range gives them 256 levels.
    ramp = np.linspace(1000, 1030, 64).reshape(8, 8).astype(np.uint16)
    dropout = ramp.copy()
    dropout[0, :4] = 0  # no reading: left out of the fit
    train = {"near": [mm(1000), ramp], "far": [mm(1030), dropout]}
    held = {"near": [mm(1005)], "far": [mm(5000)]}
    root = depth_set(tmp_path / "data", {"train": train, "val": held, "test": held})
    index = load_index(spec(root, modalities=["rgb", "depth"]), seed=0)
    fitted = depth_range(index, 8, "center_crop", tmp_path / "cache")
    assert fitted is not None and 1000 <= fitted[0] < 1001 and 1029 < fitted[1] <= 1030
    splits = load_split_arrays(index, 8, tmp_path / "cache")
    depth = {i: np.asarray(splits["train"].images["depth"][k])
             for k, i in enumerate(splits["train"].ids)}
    assert depth["near0"].max() == 0 and depth["far0"].min() == 255
    # Each of the ramp's 31 millimetres keeps a level of its own; value / 256 kept 2.
    assert len(np.unique(depth["near1"])) == len(np.unique(ramp)) == 31
    near1 = next(s.depth for s in index.splits["train"] if s.id == "near1")
    old_rule = decode_image(near1, "depth", 8)  # no range: the top 8 bits
    assert len(np.unique(old_rule)) <= 2
    assert depth["far1"][0, 0, 0] == 0  # a drop-out stays at the bottom
    val = {i: np.asarray(splits["val"].images["depth"][k]) for k, i in enumerate(splits["val"].ids)}
    assert int(val["near0"][0, 0, 0]) in range(40, 46)  # 5 of 30 mm: 255 / 6, rounded
    assert val["far0"].min() == 255  # beyond the range: clipped, not wrapped
    # The range is the training split's only: val's 5000 mm did not widen it.
    assert split_cache_key(index, 8, "center_crop", fitted) != split_cache_key(index, 8)


def test_eight_bit_depth_is_used_as_it_is(spec, tmp_path: Path):
    """8-bit maps were scaled by whoever wrote them: no range is fitted, the cache holds
    their values as they are (today's behaviour, so the demo's results do not move)."""
    rng = np.random.default_rng(0)
    maps = {"train": {label: [rng.integers(50, 200, (8, 8), dtype=np.uint8) for _ in range(2)]
                      for label in ("near", "far")}}
    root = depth_set(tmp_path / "data", maps)
    index = load_index(spec(root, modalities=["rgb", "depth"]), seed=0)
    assert fit_depth_range([s.depth for s in index.splits["train"]], 8) is None
    assert depth_range(index, 8, "center_crop", tmp_path / "cache") is None
    train = load_split_arrays(index, 8, tmp_path / "cache")["train"]
    for row, sample in enumerate(index.splits["train"]):
        as_written = np.asarray(Image.open(sample.depth))
        assert np.array_equal(train.images["depth"][row, ..., 0], as_written)


@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_depth_follows_the_rgb_geometry(resize, tmp_path: Path):
    """A wide depth map is cropped, squashed or padded like its photo."""
    pixels = np.zeros((8, 16), np.uint16)
    pixels[:, :4], pixels[:, 4:12], pixels[:, 12:] = 1000, 2000, 3000
    path = save(tmp_path / "depth.png", Image.fromarray(pixels))
    depth = decode_image(path, "depth", 8, resize=resize, depth_range=(1000.0, 3000.0))[..., 0]
    rgb = decode_image(wide_photo(tmp_path / "wide.png"), "rgb", 8, resize=resize)
    # 1000 mm -> 0, 2000 mm -> rint(127.5) = 128, 3000 mm -> 255; padding -> 0.
    assert np.array_equal(depth == 128, (rgb == GREEN).all(axis=2))
    assert np.array_equal(depth == 255, (rgb == BLUE).all(axis=2))
    assert (depth == 128).all() == (resize == "center_crop")
