"""eval.py with several methods: the comparison table, its files, the figure, bad input."""
import csv
import os

import cv2
import numpy as np
import pytest

import eval as evaluation
from utils.metrics import METRICS

SIZE = (48, 64)  # rows, columns


@pytest.fixture()
def study(tmp_path):
    """Three pairs of textured sources (the second in colour) and three methods: ``average``
    (the sources' mean), ``first`` (a copy of source 1, missing pair ``c``) and ``blur``."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE[0], 0:SIZE[1]]
    folders = {name: tmp_path / name for name in ("ir", "vis", "average", "first", "blur")}
    for folder in folders.values():
        folder.mkdir()
    for i, stem in enumerate("abc"):
        one = np.clip(120 + 90 * np.sin(xx / (2 + i)) * np.cos(yy / 3) + rng.normal(0, 4, SIZE), 0, 255).astype(np.uint8)
        two = np.clip(255 - one.astype(float) + rng.normal(0, 8, SIZE), 0, 255).astype(np.uint8)
        two_colour = np.dstack([two, np.roll(two, 3, axis=1), two // 2])
        cv2.imwrite(str(folders["ir"] / f"{stem}.png"), one)
        cv2.imwrite(str(folders["vis"] / f"{stem}.png"), two_colour)
        grey_two = cv2.cvtColor(two_colour, cv2.COLOR_BGR2GRAY)
        cv2.imwrite(str(folders["average"] / f"{stem}.png"), ((one.astype(int) + grey_two) // 2).astype(np.uint8))
        cv2.imwrite(str(folders["blur"] / f"{stem}.png"), cv2.GaussianBlur(one, (7, 7), 3))
        if stem != "c":
            cv2.imwrite(str(folders["first"] / f"{stem}.png"), one)
    return folders


def run(study, *methods, extra=()):
    return evaluation.main(["--img1", str(study["ir"]), "--img2", str(study["vis"]),
                            "--fused", *(f"{m}={study[m]}" for m in methods), "--jobs", "1", *extra])


def test_table_of_several_methods_over_the_pairs_all_fused(study, tmp_path, capsys):
    md, tex, table_csv, pairs_csv = (tmp_path / f"t.{e}" for e in ("md", "tex", "csv", "pairs.csv"))
    assert run(study, "average", "first", "blur",
               extra=("--table", str(md), "--csv", str(pairs_csv))) == 0
    out, err = capsys.readouterr()
    assert "first lacks 1 pair(s), left out of every mean: c" in err
    assert "means over the 2 pairs every method fused" in out
    # the means are those of the per-pair scores of a and b alone
    single = {m: evaluation.score_folders(str(study["ir"]), str(study["vis"]), str(study[m])) for m in ("average", "blur")}
    rows = list(csv.reader(open(pairs_csv)))
    assert rows[0][:3] == ["method", "image", "EN"]
    means = {r[0]: r for r in rows if r[1] == "mean"}
    for method, per_image in single.items():
        expected = np.mean([s["VIF"] for stem, s in per_image if stem in "ab"])
        assert float(means[method][rows[0].index("VIF")]) == pytest.approx(expected, abs=1e-6)
    # Markdown: a row per method, the best of each metric in bold; MSE is best when lowest
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| method | EN↑") and "MSE↓" in lines[0] and len(lines) == 5
    cells = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    names = list(METRICS)
    for column, name in enumerate(names):
        values = {m: float(c[column].strip("*")) for m, c in cells.items()}
        best = (min if name == "MSE" else max)(values, key=values.get)
        assert cells[best][column].startswith("**") and sum(c[column].startswith("**") for c in cells.values()) == 1
    assert run(study, "average", "first", extra=("--table", str(tex))) == 0
    text = tex.read_text()
    assert text.startswith(r"\begin{tabular}{l" + "c" * len(names) + "}") and r"\textbf{" in text
    assert "MSE $\\downarrow$" in text and text.rstrip().endswith(r"\end{tabular}")
    assert run(study, "average", "blur", extra=("--table", str(table_csv), "--metrics", "vif,Qabf")) == 0
    table = list(csv.reader(open(table_csv)))
    assert table[0] == ["method", "VIF", "Qabf"] and table[-1][0] == "best" and len(table) == 4


def test_parallel_scores_equal_serial(study, tmp_path):
    methods = [("average", str(study["average"])), ("blur", str(study["blur"]))]
    serial = evaluation.score(str(study["ir"]), str(study["vis"]), methods, jobs=1)[0]
    parallel = evaluation.score(str(study["ir"]), str(study["vis"]), methods, jobs=2)[0]
    assert serial == parallel and len(serial) == 3


def test_a_bad_pair_is_named_and_the_others_still_scored(study, capsys, tmp_path):
    cv2.imwrite(str(study["blur"] / "b.png"), np.zeros((20, 20), np.uint8))
    pairs_csv = tmp_path / "p.csv"
    assert run(study, "average", "blur", extra=("--csv", str(pairs_csv))) == 1
    out, err = capsys.readouterr()
    assert "error: blur, b: size mismatch" in err and "b.png is 20x20" in err
    assert err.strip().splitlines()[-1] == "scored 2 of 3 pairs, 1 failed"
    assert "means over the 2 pairs" in out
    assert {r[1] for r in csv.reader(open(pairs_csv))} == {"image", "a", "c", "mean"}


@pytest.mark.parametrize("args, message", [
    (["--metrics", "VIF,Sharpness"], "error: unknown metric 'Sharpness': choose from EN, SD"),
    (["--table", "t.docx"], "use a .md, .csv or .tex file name"),
    (["--zoom", "1,2,3"], "--zoom 1,2,3: give x,y,w,h"),
])
def test_bad_options_are_one_line(study, capsys, args, message):
    assert run(study, "average", extra=args) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_methods_are_one_line(study, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for fused, message in (([f"x={study['average']}", f"x={study['blur']}"], "method name 'x' is given twice"),
                           ([f"none={tmp_path / 'empty'}"], "none: no fused images in")):
        assert evaluation.main(["--img1", str(study["ir"]), "--img2", str(study["vis"]), "--fused", *fused]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_a_bare_folder_keeps_the_per_image_table(study, capsys):
    assert evaluation.main(["--img1", str(study["ir"]), "--img2", str(study["vis"]),
                            "--fused", str(study["average"]), "--jobs", "1"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["image", "EN", "SD"] and [line.split()[0] for line in lines[1:]] == ["a", "b", "c", "mean"]
    assert err == ""
    # source pairs without a fused image are named, not silently left out of the mean
    assert evaluation.main(["--img1", str(study["ir"]), "--img2", str(study["vis"]),
                            "--fused", str(study["first"]), "--jobs", "1"]) == 0
    assert "note: 1 of the source pairs have no fused image and are not scored: c" in capsys.readouterr().err


def test_figure_layout(study, tmp_path, capsys):
    """Two pairs x (2 sources + 2 methods): header, a labelled row per pair, every cell the image
    scaled to the cell width; the zoom region outlined in red and magnified in the far corner;
    the grey result of a pair with a colour source shown in colour."""
    from utils import figure as fig
    path = tmp_path / "figure.png"
    assert run(study, "average", "blur",
               extra=("--figure", str(path), "--pairs", "a,c", "--zoom", "4,4,16,12")) == 0
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    cell_height = round(SIZE[0] * fig.CELL / SIZE[1])
    assert image.shape == (fig.HEADER + 2 * (fig.ROW_LABEL + cell_height + fig.GAP) + fig.GAP,
                           4 * fig.CELL + 5 * fig.GAP, 3)
    assert (image[:fig.HEADER] < 128).any()  # the column labels
    top = fig.HEADER + fig.ROW_LABEL
    cells = [image[top:top + cell_height, fig.GAP + k * (fig.CELL + fig.GAP):][:, :fig.CELL] for k in range(4)]
    ir = cv2.resize(cv2.imread(str(study["ir"] / "a.png"), cv2.IMREAD_GRAYSCALE), (fig.CELL, cell_height),
                    interpolation=cv2.INTER_CUBIC)
    untouched = (slice(cell_height // 2, cell_height - 1), slice(8, fig.CELL // 2))  # away from box and inset
    assert np.abs(cells[0][untouched][..., 0].astype(int) - ir[untouched]).max() <= 1
    red = (cells[0][..., 0] > 200) & (cells[0][..., 1] < 60) & (cells[0][..., 2] < 60)
    scale = fig.CELL / SIZE[1]
    assert red[round(4 * scale), round(4 * scale):round(20 * scale)].all()  # the outline's top edge
    assert red[-1, -fig.CELL // 3:].all()  # the inset's frame, bottom right (the region is top left)
    average_cell = cells[2][untouched]
    assert not (np.array_equal(average_cell[..., 0], average_cell[..., 1])
                and np.array_equal(average_cell[..., 1], average_cell[..., 2]))  # in colour
    assert run(study, "average", extra=("--figure", str(path), "--pairs", "zz")) == 1
    assert "no pair named 'zz'" in capsys.readouterr().err
    assert run(study, "average", extra=("--figure", str(path), "--zoom", "60,40,10,10")) == 1
    assert "lies outside pair a (64x48)" in capsys.readouterr().err
    assert os.path.isfile(path)
