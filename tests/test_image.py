"""Image reading, colour rules, pairing and writing."""
import cv2
import numpy as np
import pytest

from utils.image import (ImageError, fuse_chroma, is_grey, output_chroma, pair_images, read_rgb,
                         stretch, to_ycrcb, write_png)


@pytest.fixture
def picture():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)


def test_reads_8bit_colour_grey_and_rgba(tmp_path, picture):
    cv2.imwrite(str(tmp_path / "c.png"), picture)  # BGR on disk
    cv2.imwrite(str(tmp_path / "g.bmp"), picture[..., 0])
    cv2.imwrite(str(tmp_path / "a.png"), np.dstack([picture, np.full((9, 7), 7, np.uint8)]))
    colour = read_rgb(str(tmp_path / "c.png"))
    assert colour.dtype == np.float32 and np.array_equal(colour, picture[..., ::-1].astype(np.float32))
    grey = read_rgb(str(tmp_path / "g.bmp"))
    assert is_grey(grey) and np.array_equal(grey[..., 0], picture[..., 0].astype(np.float32))
    assert np.array_equal(read_rgb(str(tmp_path / "a.png")), colour)


def test_reads_16bit_scaled_to_255(tmp_path):
    image = np.array([[0, 65535, 257 * 100]], dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "deep.tif"), image)
    assert np.allclose(read_rgb(str(tmp_path / "deep.tif"))[..., 0], [[0, 255, 100]], atol=1e-4)


def test_unreadable_and_missing_images(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("bad.png", "empty.jpg"):
        with pytest.raises(ImageError, match="cannot read image"):
            read_rgb(str(tmp_path / name))
    with pytest.raises(ImageError, match="not found"):
        read_rgb(str(tmp_path / "none.png"))


def test_fuse_chroma_is_the_released_formula():
    c1 = np.array([[[10.0, 200.0]]], np.float32)
    c2 = np.array([[[130.0, 0.5]]], np.float32)
    w1, w2 = np.abs(c1 - 0.5), np.abs(c2 - 0.5)
    assert np.allclose(fuse_chroma(c1, c2), (c1 * w1 + c2 * w2) / (w1 + w2 + 1e-4))
    # hand-computed: (10*9.5 + 130*129.5) / (139 + 1e-4)
    assert np.isclose(fuse_chroma(c1, c2)[0, 0, 0], (95 + 16835) / 139.0001)


def test_output_chroma_source_choice(picture):
    colour = picture.astype(np.float32)
    grey = np.repeat(colour[..., :1], 3, axis=2)
    yc, yg = to_ycrcb(colour), to_ycrcb(grey)
    assert output_chroma(grey, grey, yg, yg) is None
    assert np.array_equal(output_chroma(grey, colour, yg, yc), yc[..., 1:])
    assert np.array_equal(output_chroma(colour, grey, yc, yg), yc[..., 1:])


def test_stretch_min_max_and_constant():
    assert np.allclose(stretch(np.array([0.2, 0.4, 0.6])), [0, 0.5, 1])
    constant = np.full((4, 4), 0.3, np.float32)
    assert np.array_equal(stretch(constant), constant)


def test_pairing_by_stem_and_errors(tmp_path, picture):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for name in ("x.png", "y.png"):
        cv2.imwrite(str(a / name), picture)
    cv2.imwrite(str(b / "x.jpg"), picture)
    cv2.imwrite(str(b / "y.webp"), picture[..., ::-1], [cv2.IMWRITE_WEBP_QUALITY, 101])  # lossless
    (b / "notes.txt").write_text("ignored")
    paired = pair_images(str(a), str(b))
    assert [p[0] for p in paired] == ["x", "y"]
    assert np.array_equal(read_rgb(paired[1][2]), picture.astype(np.float32))
    cv2.imwrite(str(a / "z.png"), picture)
    with pytest.raises(ImageError, match="unpaired.*only in .*a: z"):
        pair_images(str(a), str(b))
    cv2.imwrite(str(b / "z.png"), picture)
    cv2.imwrite(str(b / "z.tif"), picture)
    with pytest.raises(ImageError, match="two images named 'z'"):
        pair_images(str(a), str(b))
    with pytest.raises(ImageError, match="not found"):
        pair_images(str(a), str(tmp_path / "missing"))


def test_write_png_round_trip(tmp_path, picture):
    write_png(str(tmp_path / "out" / "rgb.png"), picture)
    write_png(str(tmp_path / "out" / "grey.png"), picture[..., 0])
    assert np.array_equal(cv2.imread(str(tmp_path / "out" / "rgb.png"))[..., ::-1], picture)
    assert np.array_equal(cv2.imread(str(tmp_path / "out" / "grey.png"), cv2.IMREAD_UNCHANGED), picture[..., 0])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grey.png", "rgb.png"]
