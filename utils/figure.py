"""The qualitative comparison figure of a fusion paper: for a few pairs, both sources and every
method's fused image side by side, labelled, with an optional magnified inset of one region.

Layout (white background): a header of column labels (the two source folders' names, then the
methods'); per pair, a line with its name, then one cell per column, every image scaled to
``CELL`` pixels wide. ``zoom`` ``(x, y, w, h)`` in source pixels is outlined in every cell and
shown magnified in the cell's corner farthest from it. A grey result of a pair with a colour
source is shown in colour, with the chroma ``test.py`` gives it.
"""
import cv2
import numpy as np

from utils.errors import UserError
from utils.image import (colourise, is_grey, list_images, output_chroma, pair_images, read_rgb, to_uint8,
                         to_ycrcb)

CELL = 320          # px: every image's width in the figure
GAP = 8             # px between cells
HEADER = 48         # px: the column labels' band
ROW_LABEL = 36      # px: the band with a pair's name above its row
INSET = 0.45        # of a cell's width: the magnified region's width
RED = (220, 30, 30)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def put_label(canvas, text, left, top, width, height, scale=1.0, centred=True):
    """``text`` in black, scaled down to fit ``width``, centred (or left-aligned) in the box."""
    (w, h), _ = cv2.getTextSize(text, FONT, scale, 2)
    if w > width - 8:
        scale *= (width - 8) / w
        (w, h), _ = cv2.getTextSize(text, FONT, scale, 2)
    x = left + (width - w) // 2 if centred else left + 4
    cv2.putText(canvas, text, (x, top + (height + h) // 2), FONT, scale, (0, 0, 0), 2, cv2.LINE_AA)


def outline(cell, zoom, scale):
    """Outline the zoom region on a cell scaled by ``scale``; returns the corner farthest from
    it, ``(top|bottom, left|right)``, where its inset goes."""
    x, y, w, h = (round(v * scale) for v in zoom)
    cv2.rectangle(cell, (x, y), (x + max(w, 1) - 1, y + max(h, 1) - 1), RED, 2)
    right = x + w / 2 > cell.shape[1] / 2
    low = y + h / 2 > cell.shape[0] / 2
    return ("top" if low else "bottom", "left" if right else "right")


def place_inset(cell, crop, corner):
    """Magnify ``crop`` to ``INSET`` of the cell's width (at most 60 % of its height) and put it,
    framed in red, in ``corner`` of ``cell``."""
    height, width = cell.shape[:2]
    factor = min(INSET * width / crop.shape[1], 0.6 * height / crop.shape[0])
    inset = cv2.resize(crop, (max(1, round(crop.shape[1] * factor)), max(1, round(crop.shape[0] * factor))),
                       interpolation=cv2.INTER_CUBIC if factor > 1 else cv2.INTER_AREA)
    inset = cv2.copyMakeBorder(inset, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=RED)
    ih, iw = inset.shape[:2]
    top = 0 if corner[0] == "top" else height - ih
    left = 0 if corner[1] == "left" else width - iw
    cell[top:top + ih, left:left + iw] = inset
    return cell


def load_row(stem, path1, path2, fused):
    """The pair's images as RGB uint8: both sources, then each method's result (coloured with
    the sources' chroma when it is grey and a source has colour)."""
    rgb1, rgb2 = read_rgb(path1), read_rgb(path2)
    chroma = output_chroma(rgb1, rgb2, to_ycrcb(rgb1), to_ycrcb(rgb2))
    row = [to_uint8(rgb1), to_uint8(rgb2)]
    for method, path in fused:
        result = read_rgb(path)
        if result.shape != rgb1.shape:
            raise UserError(f"{method}, {stem}: the fused image is {result.shape[1]}x{result.shape[0]}, "
                            f"its sources {rgb1.shape[1]}x{rgb1.shape[0]}")
        if chroma is not None and is_grey(result):
            result = colourise(result[..., 0], chroma)
        row.append(to_uint8(result))
    return row


def figure_pairs(img1, img2, methods, stems):
    """``[(stem, path1, path2, [(method, fused path)])]`` for the chosen pairs; a name that is not
    a pair, or a pair a method did not fuse, is an error (checked before any work is done)."""
    if not stems:
        raise UserError("--figure needs at least one pair (--pairs)")
    sources = {stem: (p1, p2) for stem, p1, p2 in pair_images(img1, img2)}
    results = {name: list_images(folder) for name, folder in methods}
    pairs = []
    for stem in stems:
        if stem not in sources:
            raise UserError(f"--pairs: no pair named '{stem}' in {img1} and {img2}")
        lacking = [name for name, _ in methods if stem not in results[name]]
        if lacking:
            raise UserError(f"{lacking[0]}, {stem}: no fused image for this pair")
        pairs.append((stem, *sources[stem], [(name, results[name][stem]) for name, _ in methods]))
    return pairs


def render_comparison(path, labels, pairs, zoom=None):
    """Write the figure of ``pairs`` (``figure_pairs``) to ``path`` (PNG), columns headed by
    ``labels`` (both sources', then the methods'); ``zoom``: ``(x, y, w, h)`` or None. Returns
    the figure as RGB uint8."""
    from utils.image import write_png
    rows = []
    for stem, path1, path2, fused in pairs:
        images = load_row(stem, path1, path2, fused)
        height, width = images[0].shape[:2]
        if zoom and (zoom[0] + zoom[2] > width or zoom[1] + zoom[3] > height):
            raise UserError(f"--zoom {','.join(map(str, zoom))} lies outside pair {stem} ({width}x{height})")
        scale = CELL / width
        size = (CELL, max(1, round(height * scale)))
        cells = []
        for image in images:
            cell = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
            if zoom:
                x, y, w, h = zoom
                cell = place_inset(cell, image[y:y + h, x:x + w], outline(cell, zoom, scale))
            cells.append(cell)
        rows.append((stem, cells))
    columns = len(labels)
    figure_width = columns * CELL + (columns + 1) * GAP
    figure_height = HEADER + sum(ROW_LABEL + cells[0].shape[0] + GAP for _, cells in rows) + GAP
    figure = np.full((figure_height, figure_width, 3), 255, np.uint8)
    for column, label in enumerate(labels):
        put_label(figure, label, GAP + column * (CELL + GAP), 0, CELL, HEADER, scale=1.1)
    top = HEADER
    for stem, cells in rows:
        put_label(figure, stem, GAP, top, figure_width - 2 * GAP, ROW_LABEL, scale=0.8, centred=False)
        top += ROW_LABEL
        for column, cell in enumerate(cells):
            left = GAP + column * (CELL + GAP)
            figure[top:top + cell.shape[0], left:left + CELL] = cell
        top += cells[0].shape[0] + GAP
    write_png(path, figure)
    return figure
