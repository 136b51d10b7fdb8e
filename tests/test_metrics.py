"""Fusion metrics on hand-computable cases, and eval.py on folders."""
import importlib.util
import math
import os

import cv2
import numpy as np
import pytest

from conftest import ROOT
from utils import metrics


@pytest.fixture
def texture():
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.uniform(0, 255, (64, 72)), (0, 0), 2)
    return np.round(image)


def test_no_reference_statistics():
    constant = np.full((8, 8), 77.0)
    assert metrics.entropy(constant) == 0
    halves = np.zeros((8, 8))
    halves[:, 4:] = 255
    assert metrics.entropy(halves) == pytest.approx(1.0)
    assert metrics.standard_deviation(np.array([[0.0, 2.0]])) == pytest.approx(1.0)
    assert metrics.spatial_frequency(constant) == 0
    step = np.zeros((6, 9))
    step[:, 5:] = 12  # one horizontal difference of 12 per row among 8
    assert metrics.spatial_frequency(step) == pytest.approx(12 / math.sqrt(8))
    ramp = np.tile(np.arange(10.0) * 3, (5, 1))
    assert metrics.average_gradient(ramp) == pytest.approx(3 / math.sqrt(2))


def test_identical_images(texture):
    a = b = f = texture
    assert metrics.correlation_coefficient(a, b, f) == pytest.approx(1.0)
    assert metrics.ssim(a, b, f) == pytest.approx(2.0)
    assert metrics.vif(a, b, f) == pytest.approx(2.0)
    assert metrics.mse(a, b, f) == 0
    q = 0.9994 / (1 + math.exp(-15 * 0.5)) * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert metrics.qabf(a, b, f) == pytest.approx(q)


def test_mutual_information_of_two_levels():
    image = np.zeros((4, 4))
    image[:, :2] = 200
    assert metrics.mutual_information(image, image, image) == pytest.approx(2 * math.log(2))
    assert metrics.mutual_information(image, image, np.full((4, 4), 9.0)) == pytest.approx(0.0)


def test_scd_of_a_sum(texture):
    other = np.flipud(texture).copy()
    assert metrics.scd(texture, other, texture + other) == pytest.approx(2.0)


def test_mse_and_psnr_of_an_offset(texture):
    assert metrics.mse(texture, texture, texture + 10) == pytest.approx(100.0)
    assert metrics.psnr(texture, texture, texture + 10) == pytest.approx(10 * math.log10(255 ** 2 / 100))


def test_shifted_edge_lowers_edge_and_structure_scores():
    edge = np.zeros((32, 32))
    edge[:, 16:] = 200
    shifted = np.roll(edge, 3, axis=1)
    assert metrics.qabf(edge, edge, shifted) < 0.5 * metrics.qabf(edge, edge, edge)
    assert metrics.ssim(edge, edge, shifted) < metrics.ssim(edge, edge, edge)
    assert metrics.vif(edge, edge, shifted) < metrics.vif(edge, edge, edge)


def test_eval_script_on_folders(tmp_path, texture, capsys):
    spec = importlib.util.spec_from_file_location("refusion_eval", os.path.join(ROOT, "eval.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for folder in ("a", "b", "f"):
        (tmp_path / folder).mkdir()
    cv2.imwrite(str(tmp_path / "a" / "x.png"), texture.astype(np.uint8))
    cv2.imwrite(str(tmp_path / "b" / "x.jpg"), np.dstack([texture.astype(np.uint8)] * 3), [cv2.IMWRITE_JPEG_QUALITY, 100])
    cv2.imwrite(str(tmp_path / "f" / "x.png"), texture.astype(np.uint8))
    code = script.main(["--img1", str(tmp_path / "a"), "--img2", str(tmp_path / "b"),
                        "--fused", str(tmp_path / "f"), "--csv", str(tmp_path / "s.csv")])
    assert code == 0
    out = capsys.readouterr().out
    assert "Qabf" in out and out.strip().splitlines()[-1].startswith("mean")
    rows = (tmp_path / "s.csv").read_text().strip().splitlines()
    assert rows[0].startswith("image,EN,SD") and rows[-1].startswith("mean,")
    cv2.imwrite(str(tmp_path / "f" / "y.png"), texture.astype(np.uint8))
    assert script.main(["--img1", str(tmp_path / "a"), "--img2", str(tmp_path / "b"),
                        "--fused", str(tmp_path / "f")]) == 1
    assert "without sources: y" in capsys.readouterr().err
    (tmp_path / "f" / "y.png").unlink()
    cv2.imwrite(str(tmp_path / "b" / "x.jpg"), texture[:, :-2].astype(np.uint8))
    assert script.main(["--img1", str(tmp_path / "a"), "--img2", str(tmp_path / "b"),
                        "--fused", str(tmp_path / "f")]) == 1
    height, width = texture.shape
    assert f"x.jpg is {width - 2}x{height}" in capsys.readouterr().err


def test_smallest_scorable_image_and_one_line_error_below_it(tmp_path, texture, capsys):
    """7x7 (SSIM's window) gives finite scores; anything thinner is refused naming the image,
    never a traceback from inside a metric (a 1-pixel axis breaks AG, SF and SSIM)."""
    small = texture[:7, :7]
    assert all(np.isfinite(v) for v in metrics.evaluate(small, small[::-1], small.T).values())
    spec = importlib.util.spec_from_file_location("refusion_eval_small", os.path.join(ROOT, "eval.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for folder in ("a", "b", "f"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "thin.png"), texture[:1, :40].astype(np.uint8))
    assert script.main(["--img1", str(tmp_path / "a"), "--img2", str(tmp_path / "b"),
                        "--fused", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: thin: 40x1 pixels is too small to score: the metrics need at least 7x7 (SSIM's window)"
