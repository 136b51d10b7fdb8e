"""utils/tiled.py: the tiled forward equals the whole-image forward; test.py's --max_memory."""
import importlib.util
import os

import cv2
import numpy as np
import pytest
import torch

from conftest import ROOT, needs_reference, release_weights
from ReFusion import ReFusion
from utils.checkpoint import load_weights
from utils.runtime import parse_size
from utils.tiled import HALO, fuse, fuse_tiled, plan
import utils.runtime
import utils.tiled
from utils.tasks import TASKS

# test.py by path: the name "test" is also a package of Python's standard library
_spec = importlib.util.spec_from_file_location("refusion_test_script_tiled", os.path.join(ROOT, "test.py"))
test_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_script)
main = test_script.main

# (height, width, tile): sizes not divisible by the tile, thin images, tiles smaller than the halo
SHAPES = [(37, 53, 16), (7, 9, 4), (1, 40, 8), (40, 1, 8), (30, 30, 50)]


def assert_tiled_equals_whole(model, shapes=SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for height, width, tile in shapes:
        x = torch.rand(2, 2, height, width, generator=generator)  # two images: per-image attention
        with torch.no_grad():
            whole = model(x)
            for keep in (True, False):  # block outputs kept between sweeps, or recomputed
                tiled = fuse_tiled(model, x, tile, keep=keep)
                assert tiled.shape == whole.shape
                assert (tiled - whole).abs().max() <= 1e-5, (height, width, tile, keep)


@pytest.mark.parametrize("task", list(TASKS))
def test_tiled_equals_whole_image_with_the_shipped_weights(task):
    assert_tiled_equals_whole(load_weights(ReFusion(), os.path.join(ROOT, "models", f"ReFusion_{task}.pth")).eval())


@needs_reference
@pytest.mark.parametrize("task", list(TASKS))
def test_tiled_equals_whole_image_with_the_released_weights(task):
    assert_tiled_equals_whole(load_weights(ReFusion(), release_weights(task)).eval(), SHAPES[:2], seed=1)


def test_a_margin_below_the_receptive_radius_shows_at_the_seams():
    """The comparison above can fail: with too small a margin the tiles' edges differ."""
    model = load_weights(ReFusion(), os.path.join(ROOT, "models", "ReFusion_IVIF.pth")).eval()
    x = torch.rand(1, 2, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(x)
        assert (fuse_tiled(model, x, 16, halo=HALO // 2) - whole).abs().max() > 1e-4
        assert (fuse_tiled(model, x, 16) - whole).abs().max() <= 1e-5
    # the model is left as it was: no override in force, every block's own forward
    from utils.kernels.attention import ATTENTION_OVERRIDE
    assert ATTENTION_OVERRIDE.get() is None
    assert not [b for b in utils.tiled.attention_blocks(model) if "forward" in vars(b)]
    with torch.no_grad():
        assert torch.equal(model(x), whole)


def test_memory_budget_picks_whole_image_or_tiles(monkeypatch):
    per_pixel, gigabytes, share = utils.tiled.BYTES_PER_PIXEL, 2 ** 30, utils.tiled.PLANNED_SHARE
    assert plan(100, 100, None) == (None, False) and plan(100, 100, gigabytes) == (None, False)
    tile, keep = plan(2048, 2048, 2 * gigabytes)  # the kept block outputs fit beside a tile
    kept = utils.tiled.margined_pixels(2048, 2048, tile) * utils.tiled.KEPT_BYTES_PER_PIXEL
    assert keep and 128 <= tile < 2048 and (tile + 2 * HALO) ** 2 * per_pixel + kept <= 2 * gigabytes * share
    larger_kept = utils.tiled.margined_pixels(2048, 2048, tile + 8) * utils.tiled.KEPT_BYTES_PER_PIXEL
    assert (tile + 8 + 2 * HALO) ** 2 * per_pixel + larger_kept > 2 * gigabytes * share  # the largest
    # margined_pixels counts each tile's margin, clipped at the image's edges
    assert utils.tiled.margined_pixels(100, 30, 50) == (50 + HALO + HALO + 50) * 30
    tile, keep = plan(8192, 8192, 2 * gigabytes)  # they do not: every sweep starts from the input
    assert not keep and 16 <= tile and (tile + 2 * HALO) ** 2 * per_pixel <= 2 * gigabytes * share
    calls = []
    monkeypatch.setattr(utils.tiled, "fuse_tiled", lambda model, x, tile, keep: calls.append(tile) or model(x))
    model = ReFusion().eval()
    fuse(model, torch.rand(1, 2, 40, 40), max_memory=gigabytes)
    assert calls == []
    fuse(model, torch.rand(1, 2, 40, 40), max_memory=40 * 40 * per_pixel - 1)
    assert calls == [16]


def test_available_memory_on_each_kind_of_device(monkeypatch):
    """auto's budget: MemAvailable on Linux, half the physical memory where /proc/meminfo is
    missing (macOS), Metal's recommendation less the driver's share on MPS."""
    cpu = torch.device("cpu")
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as stream:
            line = next(l for l in stream if l.startswith("MemAvailable:"))
        assert abs(utils.runtime.available_memory(cpu) - int(line.split()[1]) * 1024) < 2 ** 30
    import io
    import resource
    real_open, files = open, {"/proc/meminfo": None}

    def fake_open(path, *args, **kwargs):
        if path in files:
            if files[path] is None:
                raise FileNotFoundError(path)
            return io.StringIO(files[path])
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        files[cgroup] = None
    half = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    assert utils.runtime.available_memory(cpu) == half
    # a container's cgroup limit (v2) bounds it: limit less usage
    files.update({"/sys/fs/cgroup/memory.max": "2147483648\n", "/sys/fs/cgroup/memory.current": "536870912\n"})
    assert utils.runtime.available_memory(cpu) == min(half, 3 * 2 ** 29)
    files["/sys/fs/cgroup/memory.max"] = "max\n"  # no limit
    assert utils.runtime.available_memory(cpu) == half
    # so does ulimit -v: the limit less the address space in use
    with real_open("/proc/self/status") as stream:
        used = next(int(l.split()[1]) * 1024 for l in stream if l.startswith("VmSize:"))
    monkeypatch.setattr(resource, "getrlimit", lambda which: (used + 2 ** 30, resource.RLIM_INFINITY))
    assert abs(utils.runtime.available_memory(cpu) - 2 ** 30) < 2 ** 28
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 12 * 2 ** 30)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 5 * 2 ** 30)
    assert utils.runtime.available_memory(torch.device("mps")) == 7 * 2 ** 30


@pytest.mark.parametrize("text, size", [("512MB", 512 * 2 ** 20), ("4GB", 4 * 2 ** 30), ("1.5g", int(1.5 * 2 ** 30)),
                                        ("800M", 800 * 2 ** 20), ("1000", 1000), ("auto", None)])
def test_memory_sizes(text, size):
    assert parse_size(text) == size


def write_pair(folder, height, width):
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
    yy, xx = np.mgrid[0:height, 0:width]
    scene = 127 + 90 * np.sin(xx / 5) * np.cos(yy / 7)
    cv2.imwrite(str(folder / "a" / "p.png"), np.clip(scene + rng.normal(0, 8, scene.shape), 0, 255).astype(np.uint8))
    colour = np.stack([255 - scene, scene, np.full_like(scene, 90)], axis=-1)
    cv2.imwrite(str(folder / "b" / "p.png"), np.clip(colour, 0, 255).astype(np.uint8))


def test_test_py_with_a_small_max_memory_writes_the_same_images(tmp_path):
    write_pair(tmp_path / "in", 90, 70)
    args = ["--task", "IVIF", "--img1", str(tmp_path / "in" / "a"), "--img2", str(tmp_path / "in" / "b"),
            "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    assert main(args + ["--out", str(tmp_path / "tiled"), "--max_memory", "12MB"]) == 0  # 2 x 2 tiles
    for kind in ("Gray", "RGB"):
        whole, tiled = (cv2.imread(str(tmp_path / run / kind / "p.png"), cv2.IMREAD_UNCHANGED).astype(int)
                        for run in ("whole", "tiled"))
        assert np.abs(whole - tiled).max() <= 1


def test_running_out_of_memory_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    write_pair(tmp_path / "in", 30, 40)

    def fail(*_):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(utils.tiled, "fuse", fail)
    out = tmp_path / "out"
    assert main(["--task", "IVIF", "--img1", str(tmp_path / "in" / "a"), "--img2", str(tmp_path / "in" / "b"),
                 "--out", str(out), "--max_memory", "1GB"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert err == ["error: p: out of memory fusing 40x30 on cpu; try a smaller --max_memory (e.g. 1GB) "
                   "to fuse it in tiles"]
    assert not (out / "Gray").exists() or not os.listdir(out / "Gray")
    assert main(["--task", "IVIF", "--img1", str(tmp_path / "in" / "a"), "--img2", str(tmp_path / "in" / "b"),
                 "--out", str(out), "--max_memory", "plenty"]) == 1
    assert "cannot read memory size 'plenty'" in capsys.readouterr().err


def test_a_max_memory_below_one_tile_is_refused_with_the_least_that_works(tmp_path, capsys):
    from utils.tiled import LEAST_BUDGET, plan
    assert plan(400, 400, LEAST_BUDGET)[0] is not None  # the least budget plans a tile
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "p.png"), np.zeros((30, 40), np.uint8))
    spec = importlib.util.spec_from_file_location("refusion_test_script_m", os.path.join(ROOT, "test.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--task", "IVIF", "--img1", str(tmp_path / "a"), "--img2", str(tmp_path / "b"),
            "--model", str(tmp_path / "none.pth"), "--out", str(tmp_path / "out")]
    torch.save(ReFusion().state_dict(), tmp_path / "none.pth")
    assert script.main(args + ["--max_memory", "1KB"]) == 1
    least = -(-LEAST_BUDGET // 2 ** 20)
    assert capsys.readouterr().err.strip() == (
        f"error: --max_memory 1KB (1024 bytes) is less than one 16 px tile needs: give at least {least}MB")
    assert script.main(args + ["--max_memory", "512"]) == 1
    assert "(512 bytes)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
