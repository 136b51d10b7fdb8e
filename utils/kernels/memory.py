"""Evaluation orders that keep the widest feature maps small: strips, channel groups, in-place
products. Each gives the same values as the plain expression it replaces."""
import torch

from utils.kernels.linear import depthwise_conv3x3, depthwise_conv3x3_gelu, pointwise_conv

CHANNELS_LAST = torch.channels_last
STRIP_PIXELS = 1 << 16


def in_strips(local_fn, x):
    """``local_fn(x)``, computed in horizontal strips when no gradient is needed.

    ``local_fn`` must map ``(B,C,H,W)`` to ``(B,C',H,W)`` and see at most one row above and
    below each output row (pointwise ops and 3x3 zero-padded convolutions). Strips of about
    ``STRIP_PIXELS`` pixels with a one-row halo give the same values as one call, but the wide
    intermediate maps (up to 8x the input channels) only ever exist for one strip: inference
    memory stays near the size of the input and output, and the strips stay in cache.
    """
    height, width = x.shape[-2:]
    rows = max(8, STRIP_PIXELS // width)
    if torch.is_grad_enabled() or height <= rows:
        return local_fn(x)
    out = None
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        first, last = max(top - 1, 0), min(bottom + 1, height)
        strip = local_fn(x[:, :, first:last])[:, :, top - first:bottom - first]
        if out is None:
            out = torch.empty((x.shape[0], strip.shape[1], height, width), dtype=strip.dtype,
                              device=strip.device, memory_format=CHANNELS_LAST)
        out[:, :, top:bottom] = strip
    return out


def conv_part(x, pointwise, depthwise, part, parts, gelu=False):
    """Channel group ``part`` of ``parts`` equal groups of ``depthwise(pointwise(x))`` (the two
    convolution modules' weights), through an exact GELU if ``gelu``.

    Each group (q, k or v; gate or value) is computed on its own from its rows of both weights.
    Every part comes out contiguous, which the GELU, products and transposes that follow need to
    run at full speed, and the widest map alive is one part: on a 256x256 image a 96- or
    128-channel map (24-32 MB) spills out of a 32 MB L3 cache, where its convolutions run 2-5x
    slower per channel.
    """
    size = pointwise.weight.shape[0] // parts
    rows = slice(part * size, (part + 1) * size)
    spatial = depthwise_conv3x3_gelu if gelu else depthwise_conv3x3
    return spatial(pointwise_conv(x, pointwise.weight[rows]), depthwise.weight[rows])


def conv_parts(x, pointwise, depthwise, parts):
    """All ``parts`` groups of ``conv_part`` as a tuple (``depthwise(pointwise(x)).chunk(parts)``),
    each computed in strips."""
    return tuple(in_strips(lambda t, part=part: conv_part(t, pointwise, depthwise, part, parts), x)
                 for part in range(parts))


def gated_product(gate, value):
    """``gate * value``; without autograd in place in ``gate``, which lowers peak memory."""
    if torch.is_grad_enabled():
        return gate * value
    return gate.mul_(value)
