"""The fusion network F on images of any size in bounded memory, with the whole-image result.

Every layer of F is local (3x3 convolutions and per-pixel maps) except the channel attention,
whose per-head (c x c) matrix ``softmax(<q_i, k_j> / (|q_i| |k_j|) * t)`` sums over all pixels.
Given those matrices the network is local, with a receptive radius of ``HALO`` pixels. So F runs
tile by tile, each tile with a ``HALO``-pixel margin, in sweeps over the image:

1. at each attention layer whose matrix is not known yet, the tile's interior is added to sums
   of ``q k^T``, ``|q|^2`` and ``|k|^2`` (float64); the matrix comes back as NaN and the block
   that holds the layer stops where it would use it, returning NaN: everything computed from an
   unknown matrix is marked. A block given NaN returns NaN at once, and a sweep stops at the
   second such block in a row;
2. the matrices are formed from the sums; a sweep that meets no unknown matrix gives the output.

The two encoder branches are independent, so one sweep collects both branches' layer at the same
depth: six sweeps in all. A block whose output is final (no NaN) is kept per tile, while the
memory budget allows, so that a later sweep starts from it instead of from the input. The min-max
stretch of the output (``utils.image.stretch``) is applied to the whole image afterwards, as for
a whole-image forward.
"""
import weakref

import torch

from utils.kernels.attention import ATTENTION_OVERRIDE
from utils.runtime import available_memory

# 3x3 convolutions on the path from input to output: the stem, two per transformer block (q, k, v
# and the feed-forward's depthwise) in two encoder and two decoder blocks, two in the merge and
# two in the head: 1 + 2*2 + 2 + 2*2 + 2.
HALO = 13
# Working memory of a whole-image forward per pixel, float32 (measured: 2.0-2.1 KB at 1024x1024
# and 2048x2048 on CPU), with room for the allocator's slack.
BYTES_PER_PIXEL = 2400
# What keeping the widest block output (2 x 16 encoder channels, or 32) costs per pixel.
KEPT_BYTES_PER_PIXEL = 32 * 4
# The share of a budget that plan() fills: the heap's fragmentation and the sums come on top (at
# 4096x4096 a plan for 2 GB at 0.7 of it peaked 2.54 GB, images and the process included).
PLANNED_SHARE = 0.6
# Below this side, keeping block outputs costs more in margins than it saves in recomputation.
LEAST_KEPT_TILE = 128
# The smallest tile: below it the margins would be nearly all of the work.
LEAST_TILE = 16
# The least budget ``plan`` accepts: what one LEAST_TILE tile with its margins needs.
LEAST_BUDGET = int((LEAST_TILE + 2 * HALO) ** 2 * BYTES_PER_PIXEL / PLANNED_SHARE) + 1


class _StopSweep(Exception):
    """Nothing more of this tile's forward can be used in this sweep."""


class _SkipBlock(Exception):
    """The rest of this block depends on an attention matrix not known yet."""


class _Sweep:
    """One pass over the tiles: known matrices by layer (the block and the call's order in it),
    sums for the others, the blocks' kept outputs per tile."""

    def __init__(self, known, kept, consumer):
        # consumer: block -> the block its output feeds, learned as the blocks run
        self.known, self.kept, self.consumer, self.sums, self.complete = known, kept, consumer, {}, True

    def start_tile(self, index, rows, cols):
        self.tile, self.rows, self.cols, self.skipped_in_a_row = index, rows, cols, 0
        self.block, self.calls = None, 0
        self.produced_by = {}  # id(output) -> (block, weak reference to the output)

    # the attention override (utils.kernels.attention)
    def matrix(self, q, k, temperature):
        index, self.calls = (self.block, self.calls), self.calls + 1
        if index in self.known:
            return self.known[index]
        self.complete = False
        batch, channels = q.shape[:2]
        heads = temperature.shape[0]
        unknown = q.new_full((batch, heads, channels // heads, channels // heads), float("nan"))
        # run_block gives no block NaN inputs, so q and k are final here
        q_rows, k_rows = (t[:, :, self.rows, self.cols].reshape(batch, heads, channels // heads, -1)
                          for t in (q, k))
        # float64 sums; MPS has no float64, so there the tile's float32 sums are added on the CPU
        mps = q.device.type == "mps"
        wide, where = (torch.float32, "cpu") if mps else (torch.float64, q.device)
        tile_sums = (q_rows @ k_rows.transpose(-2, -1), (q_rows * q_rows).sum(-1, dtype=wide),
                     (k_rows * k_rows).sum(-1, dtype=wide))
        qk, qq, kk = self.sums.get(index, (0, 0, 0, None))[:3]
        qk, qq, kk = (total + part.to(where, torch.float64) for total, part in zip((qk, qq, kk), tile_sums))
        self.sums[index] = (qk, qq, kk, temperature)
        return unknown

    def before_use(self, attn):
        if torch.isnan(attn).any():
            raise _SkipBlock

    # the blocks that hold attention layers
    def producer(self, x):
        entry = self.produced_by.get(id(x))
        return entry[0] if entry is not None and entry[1]() is x else None

    def run_block(self, block, forward, inputs):
        kept = self.kept.get(self.tile, {}) if self.kept is not None else {}
        for x in inputs:
            if self.producer(x) is not None:
                self.consumer[self.producer(x)] = block
        later = self.consumer.get(block)
        while later is not None and later not in kept:
            later = self.consumer.get(later)
        if later is not None:  # a block downstream is kept: this output will not be read
            return inputs[0]
        if block in kept:
            out = kept[block]
        elif any(torch.isnan(x).any() for x in inputs):
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row == 2:
                raise _StopSweep
            return torch.full_like(torch.cat(inputs, dim=1), float("nan"))
        else:
            self.block, self.calls = block, 0
            try:
                out = forward(*inputs)
            except _SkipBlock:
                self.skipped_in_a_row = 0
                return torch.full_like(torch.cat(inputs, dim=1), float("nan"))
            finally:
                self.block = None
            if self.kept is not None and not torch.isnan(out).any():
                kept = self.kept.setdefault(self.tile, {})
                kept[block] = out
                for x in inputs:  # kept outputs feeding this block are not needed again
                    kept.pop(self.producer(x), None)
        self.skipped_in_a_row = 0
        self.produced_by[id(out)] = (block, weakref.ref(out))
        return out

    def matrices(self):
        """The attention matrices of the layers summed in this sweep."""
        out = {}
        for index, (qk, qq, kk, temperature) in self.sums.items():
            norms = qq.sqrt().clamp_min(1e-12)[..., :, None] * kk.sqrt().clamp_min(1e-12)[..., None, :]
            out[index] = torch.softmax((qk / norms).to(temperature.device, temperature.dtype) * temperature,
                                       dim=-1)
        return out


def tiles(height, width, size):
    """``(top, bottom, left, right)`` of the tiles of a ``height x width`` image, row by row."""
    for top in range(0, height, size):
        for left in range(0, width, size):
            yield top, min(top + size, height), left, min(left + size, width)


def attention_blocks(model):
    """The modules of ``model`` that hold attention layers (transformer blocks, the merge)."""
    from ReFusion import CrossAttentionMerge, TransformerBlock
    return [m for m in model.modules() if isinstance(m, (TransformerBlock, CrossAttentionMerge))]


def fuse_tiled(model, x, tile, halo=HALO, keep=True):
    """``model(x)`` for ``x`` ``(B,2,H,W)``, computed in ``tile x tile`` pieces (plus ``halo``);
    equal to the whole-image forward up to float32 rounding. ``keep``: keep final block outputs
    between sweeps (faster; memory about 128 bytes per pixel). Call under ``torch.no_grad()``."""
    batch, _, height, width = x.shape
    known, kept, consumer, out = {}, {} if keep else None, {}, None
    blocks = attention_blocks(model)
    while out is None:
        sweep = _Sweep(known, kept, consumer)
        token = ATTENTION_OVERRIDE.set(sweep)
        for block in blocks:  # an instance attribute shadows the class's forward for this call
            block.forward = lambda *inputs, block=block, forward=block.forward: sweep.run_block(block, forward, inputs)
        try:
            for index, (top, bottom, left, right) in enumerate(tiles(height, width, tile)):
                first, last = max(top - halo, 0), min(bottom + halo, height)
                start, end = max(left - halo, 0), min(right + halo, width)
                rows, cols = slice(top - first, bottom - first), slice(left - start, right - start)
                sweep.start_tile(index, rows, cols)
                try:
                    fused = model(x[:, :, first:last, start:end])
                except _StopSweep:
                    continue
                if sweep.complete:  # every matrix known: this tile is output
                    if out is None:
                        out = x.new_empty((batch, 1, height, width))
                    out[:, :, top:bottom, left:right] = fused[:, :, rows, cols]
        finally:
            ATTENTION_OVERRIDE.reset(token)
            for block in blocks:
                del block.forward
        known.update(sweep.matrices())
    return out


def margined_pixels(height, width, tile):
    """Pixels of all tiles with their margins (what kept block outputs cover)."""
    def extent(length):
        return sum(min(start + tile + HALO, length) - max(start - HALO, 0) for start in range(0, length, tile))
    return extent(height) * extent(width)


def plan(height, width, budget):
    """``(tile, keep)`` for a ``height x width`` image and ``budget`` bytes: tile None when a
    whole-image forward fits (or no budget is known); else the side of the largest tile whose
    forward (margin included) fits beside the kept block outputs of all tiles (keep True), when
    such a tile is at least LEAST_KEPT_TILE; otherwise the largest whose forward fits alone (keep
    False); at least LEAST_TILE pixels (callers refuse budgets under LEAST_BUDGET)."""
    if budget is None or height * width * BYTES_PER_PIXEL <= budget:
        return None, False
    budget *= PLANNED_SHARE
    alone = max(LEAST_TILE, int((budget / BYTES_PER_PIXEL) ** 0.5) - 2 * HALO)
    for side in range(alone, LEAST_KEPT_TILE - 1, -8):
        kept = margined_pixels(height, width, side) * KEPT_BYTES_PER_PIXEL
        if (side + 2 * HALO) ** 2 * BYTES_PER_PIXEL + kept <= budget:
            return side, True
    return alone, False


def fuse(model, x, max_memory=None):
    """``model(x)`` for ``x`` ``(B,2,H,W)``: whole-image when its working memory fits in
    ``max_memory`` bytes (None: what is available on ``x``'s device now), else exactly from tiles."""
    budget = max_memory if max_memory is not None else available_memory(x.device)
    tile, keep = plan(x.shape[-2], x.shape[-1], budget and budget / max(1, x.shape[0]))
    with torch.no_grad():
        return model(x) if tile is None else fuse_tiled(model, x, tile, keep=keep)
