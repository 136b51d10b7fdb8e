"""The fusion network F on images of any size in bounded memory, with the whole-image result.

Every layer of F is local (3x3 convolutions and per-pixel maps) except the channel attention,
whose per-head (c x c) matrix ``softmax(<q_i, k_j> / (|q_i| |k_j|) * t)`` sums over all pixels.
Given those matrices the network is local, with a receptive radius of ``HALO`` pixels. So F runs
tile by tile, each tile with a ``HALO``-pixel margin, in sweeps over the image:

1. at each attention layer whose matrix is not known yet, the tile's interior is added to sums
   of ``q k^T``, ``|q|^2`` and ``|k|^2`` (float64), and the layer returns a NaN matrix, which
   marks everything computed from it; a layer whose q or k carry NaN depends on an unknown
   matrix and is skipped, and a sweep stops at the second such layer in a row;
2. the matrices are formed from the sums; a sweep that meets no unknown matrix gives the output.

The two encoder branches are independent, so one sweep collects both branches' layer at the same
depth: six sweeps in all. The output's min-max stretch (``utils.image.stretch``) is applied to the
whole fused image afterwards, as for a whole-image forward.
"""
import torch

from utils.kernels.attention import ATTENTION_OVERRIDE

# 3x3 convolutions on the path from input to output: the stem, two per transformer block (q, k, v
# and the feed-forward's depthwise) in two encoder and two decoder blocks, two in the merge and
# two in the head: 1 + 2*2 + 2 + 2*2 + 2.
HALO = 13
# Working memory of a whole-image forward per pixel, float32 (measured: 2.0-2.1 KB at 1024x1024
# and 2048x2048 on CPU), with room for the allocator's slack.
BYTES_PER_PIXEL = 2400


class _StopSweep(Exception):
    """Nothing more of this tile's forward can be used in this sweep."""


class _Sweep:
    """The attention override for one sweep: known matrices by call order, sums for the rest."""

    def __init__(self, known, total):
        # total: attention layers in a forward, once a forward has run to its end (else None)
        self.known, self.total, self.sums, self.complete = known, total, {}, True

    def start_tile(self, rows, cols):
        self.rows, self.cols, self.calls, self.skipped_in_a_row = rows, cols, 0, 0

    def __call__(self, q, k, temperature):
        index, self.calls = self.calls, self.calls + 1
        if index in self.known:
            return self.known[index]
        self.complete = False
        batch, channels = q.shape[:2]
        heads = temperature.shape[0]
        unknown = q.new_full((batch, heads, channels // heads, channels // heads), float("nan"))
        q_rows, k_rows = (t[:, :, self.rows, self.cols].reshape(batch, heads, channels // heads, -1).double()
                          for t in (q, k))
        last = index + 1 == self.total  # what follows the last attention layer is of no use here
        if torch.isnan(q_rows).any() or torch.isnan(k_rows).any():
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row == 2 or last:
                raise _StopSweep
            return unknown
        self.skipped_in_a_row = 0
        qk, qq, kk, _ = self.sums.get(index, (0, 0, 0, None))
        self.sums[index] = (qk + q_rows @ k_rows.transpose(-2, -1), qq + q_rows.square().sum(-1),
                            kk + k_rows.square().sum(-1), temperature)
        if last:
            raise _StopSweep
        return unknown

    def matrices(self):
        """The attention matrices of the layers summed in this sweep, by call order."""
        out = {}
        for index, (qk, qq, kk, temperature) in self.sums.items():
            norms = qq.sqrt().clamp_min(1e-12)[..., :, None] * kk.sqrt().clamp_min(1e-12)[..., None, :]
            out[index] = torch.softmax((qk / norms).to(temperature.dtype) * temperature, dim=-1)
        return out


def tiles(height, width, size):
    """``(top, bottom, left, right)`` of the tiles of a ``height x width`` image, row by row."""
    for top in range(0, height, size):
        for left in range(0, width, size):
            yield top, min(top + size, height), left, min(left + size, width)


def fuse_tiled(model, x, tile, halo=HALO):
    """``model(x)`` for ``x`` ``(B,2,H,W)``, computed in ``tile x tile`` pieces (plus ``halo``);
    equal to the whole-image forward up to float32 rounding. Call under ``torch.no_grad()``."""
    batch, _, height, width = x.shape
    known, total, out = {}, None, None
    while out is None:
        sweep = _Sweep(known, total)
        token = ATTENTION_OVERRIDE.set(sweep)
        try:
            for top, bottom, left, right in tiles(height, width, tile):
                first, last = max(top - halo, 0), min(bottom + halo, height)
                start, end = max(left - halo, 0), min(right + halo, width)
                rows, cols = slice(top - first, bottom - first), slice(left - start, right - start)
                sweep.start_tile(rows, cols)
                try:
                    fused = model(x[:, :, first:last, start:end])
                except _StopSweep:
                    continue
                total = sweep.calls
                if sweep.complete:  # every matrix known: this tile is output
                    if out is None:
                        out = x.new_empty((batch, 1, height, width))
                    out[:, :, top:bottom, left:right] = fused[:, :, rows, cols]
        finally:
            ATTENTION_OVERRIDE.reset(token)
        known.update(sweep.matrices())
    return out


def parse_size(text):
    """``"512MB"``, ``"4GB"``, ``"1.5G"``, ``"800M"`` or bytes -> bytes; ``"auto"`` -> None."""
    import re

    from utils.errors import UserError
    text = str(text).strip()
    if text.lower() == "auto":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([kmgt]?)i?b?", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"cannot read memory size '{text}': use e.g. 512MB, 4GB or auto")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


def available_memory(device):
    """Bytes a forward may use now: free memory on a CUDA device; otherwise the system's
    available memory (Linux's MemAvailable), or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def tile_for(height, width, budget):
    """None when a whole-image forward fits in ``budget`` bytes (or no budget is known), else the
    side of the largest tile whose forward (margin included) fits, at least 16 pixels."""
    if budget is None or height * width * BYTES_PER_PIXEL <= budget:
        return None
    side = int((budget / BYTES_PER_PIXEL) ** 0.5) - 2 * HALO
    return max(16, side)


def fuse(model, x, max_memory=None):
    """``model(x)`` for ``x`` ``(B,2,H,W)``: whole-image when its working memory fits in
    ``max_memory`` bytes (None: what is available on ``x``'s device now), else exactly from tiles."""
    budget = max_memory if max_memory is not None else available_memory(x.device)
    tile = tile_for(x.shape[-2], x.shape[-1], budget and budget / max(1, x.shape[0]))
    with torch.no_grad():
        return model(x) if tile is None else fuse_tiled(model, x, tile)
