"""ReFusion networks (Bai et al., IJCV 2024).

Three networks built from the same Restormer-style blocks:

* ``ReFusion`` -- the fusion module F: two Y channels ``(B,2,H,W)`` -> fused ``(B,1,H,W)``.
* ``LPN``      -- the loss proposal module P: per-pixel weights of F's intensity/gradient loss.
* ``ReN``      -- the reconstruction module R: fused ``(B,1,H,W)`` -> both sources ``(B,2,H,W)``.

Every module keeps its parameters as ordinary ``nn.Parameter`` attributes and reads them only
through ``self``, so ``torch.func.functional_call(net, params, x)`` runs it with substituted
parameters (the virtual steps of meta-learning) without any shadow copies.

Speed: feature maps are kept in channels-last memory layout, so 1x1 and depthwise 3x3
convolutions hit oneDNN's fast NHWC kernels and the channel LayerNorm is a plain
``F.layer_norm`` over the last axis; the attention output projection is folded into the (tiny)
attention matrix so it costs no extra pass over the pixels; without gradients the GELU and the
residual sums ride on the convolution or matmul before them (more in ARCHITECTURE.md).
"""
import cv2
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.convolutions import (depthwise_conv3x3, depthwise_conv3x3_gelu, per_image_pointwise,
                                per_image_pointwise_add, pointwise_conv, pointwise_conv_add,
                                records_graph)

CHANNELS_LAST = torch.channels_last
STRIP_PIXELS = 1 << 16


def in_strips(local_fn, x):
    """``local_fn(x)`` computed in horizontal strips when no gradient is needed.

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


def _release_conv_key_hook(module, state_dict, prefix, *_):
    """Accept the authors' checkpoints, which store each conv weight twice.

    The release wraps every ``nn.Conv2d`` as ``x.conv`` and also exposes its weight as
    ``x.weight``, so its state dicts hold ``x.weight`` and ``x.conv.weight`` (same tensor).
    We keep one key per parameter; the duplicate is dropped after checking it agrees.
    """
    duplicate = state_dict.pop(prefix + "conv.weight", None)
    if duplicate is None:
        return
    if prefix + "weight" not in state_dict:
        state_dict[prefix + "weight"] = duplicate
    elif not torch.equal(state_dict[prefix + "weight"], duplicate):
        raise RuntimeError(f"checkpoint keys {prefix}weight and {prefix}conv.weight disagree")


class Conv2d(nn.Conv2d):
    """Bias-free ``nn.Conv2d`` that also loads the release's duplicated weight keys.

    Output is channels-last so the blocks downstream see a consistent layout.
    """

    def __init__(self, in_channels, out_channels, kernel_size, groups=1):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                         groups=groups, bias=False)
        self.register_load_state_dict_pre_hook(_release_conv_key_hook)

    def forward(self, x):
        return super().forward(x.contiguous(memory_format=CHANNELS_LAST)).contiguous(
            memory_format=CHANNELS_LAST)


class PointwiseConv(Conv2d):
    """1x1 convolution ``(B,Cin,H,W) -> (B,Cout,H,W)``, channels-last.

    oneDNN's 1x1 kernel on channels-last data is ~2x faster than the equivalent matmul through
    MKL on this CPU; ``utils.convolutions`` keeps its derivatives channels-last 1x1 convolutions
    and GEMMs, which PyTorch's own double backward of a convolution does not.
    """

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x):
        return pointwise_conv(x, self.weight)


class DepthwiseConv(Conv2d):
    """Depthwise 3x3 convolution, zero padding. ``(B,C,H,W) -> (B,C,H,W)``, channels-last.

    Runs through ``utils.convolutions``, whose backward is itself made of depthwise convolutions,
    so a double backward avoids PyTorch's slow per-group fallback on CPU.
    """

    def __init__(self, channels):
        super().__init__(channels, channels, 3, groups=channels)

    def forward(self, x):
        return depthwise_conv3x3(x, self.weight)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``(B,C,H,W)`` with weight and bias (eps 1e-5).

    Matches Restormer's "WithBias" LayerNorm (biased variance); ``body`` keeps the release's keys.
    """

    def __init__(self, dim):
        super().__init__()
        self.body = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x):
        nhwc = x.contiguous(memory_format=CHANNELS_LAST).permute(0, 2, 3, 1)
        return self.body(nhwc).permute(0, 3, 1, 2)


def gate_product(gate, value):
    """``gate * value``; without autograd in place in ``gate``, which lowers peak memory."""
    if torch.is_grad_enabled():
        return gate * value
    return gate.mul_(value)


def expand_part(x, expand, depthwise, part, parts, gelu=False):
    """Channel group ``part`` of ``parts`` equal groups of ``depthwise(pointwise(x))``, through
    an exact GELU if ``gelu``.

    Each group (q, k or v; gate or value) is computed on its own from its rows of both weights.
    Every part comes out contiguous, which the GELU, products and
    transposes that follow need to run at full speed, and the widest map alive is one part: on
    a 256x256 image a 96- or 128-channel map (24-32 MB) spills out of this CPU's 32 MB L3 cache,
    where its convolutions run 2-5x slower per channel.
    """
    size = expand.weight.shape[0] // parts
    rows = slice(part * size, (part + 1) * size)
    spatial = depthwise_conv3x3_gelu if gelu else depthwise_conv3x3
    return spatial(pointwise_conv(x, expand.weight[rows]), depthwise.weight[rows])


def expand_parts_in_strips(x, expand, depthwise, parts):
    """All ``parts`` groups of ``expand_part``, as a tuple, each computed with ``in_strips``
    (for callers that are not already inside ``in_strips``)."""
    return tuple(in_strips(lambda t, part=part: expand_part(t, expand, depthwise, part, parts), x)
                 for part in range(parts))


def row_major_copy(x):
    """NCHW copy of a channels-last map: ``(B,C,H,W) -> (B,C,H*W)`` contiguous.

    Differentiable to any order; its gradient goes back channels-last, the layout of the
    convolutions upstream.
    """
    return transpose_copy(pixel_rows(x))


def pixel_rows(x):
    """``(B,C,H,W) -> (B,H*W,C)``: a view of the map in channels-last memory (a copy only if
    ``x`` is not channels-last)."""
    batch, channels, height, width = x.shape
    return x.contiguous(memory_format=CHANNELS_LAST).permute(0, 2, 3, 1).reshape(
        batch, height * width, channels)


def transpose_copy(x):
    """``(B,R,S) -> (B,S,R)`` contiguous copy; its gradient is the same copy of the gradient.

    On CPU the copy is OpenCV's cache-blocked transpose: on the attention's pixel-row maps
    (16-32 channels) 1.4-3x faster here than a strided ``.contiguous()`` or an identity GEMM
    (the GEMM does C times the work of a copy). Exact, being a copy.
    """
    if torch.is_grad_enabled():  # the Function also carries it through torch.func's transforms
        return _TransposeCopy.apply(x)
    return _transpose_copy(x)


_OPENCV_DTYPES = (torch.float32, torch.float64)


def _transpose_copy(x):
    if x.device.type != "cpu" or x.dtype not in _OPENCV_DTYPES:
        return x.transpose(-2, -1).contiguous()
    x = x.detach().contiguous()
    out = x.new_empty(x.shape[0], x.shape[2], x.shape[1])
    for image, target in zip(x.numpy(), out.numpy()):
        cv2.transpose(image, target)
    return out


class _TransposeCopy(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return _transpose_copy(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass  # nothing to save; a separate setup_context is what lets torch.func transform it

    @staticmethod
    def backward(ctx, grad):
        return transpose_copy(grad)

    @staticmethod
    def jvp(ctx, tangent):
        return transpose_copy(tangent)


class _RowNorms(torch.autograd.Function):
    """L2 norms over the last axis, ``(..., N) -> (...)``, differentiable to any order.

    Its gradient ``rows * (g / norm)`` guards the zero norms on the small ``g / norm`` tensor;
    autograd's own masks the full-size product, one more pass over the maps per derivative.
    """

    @staticmethod
    def forward(rows):
        return torch.linalg.vector_norm(rows, dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)
        ctx.save_for_forward(inputs[0], output)

    @staticmethod
    def backward(ctx, grad):
        rows, norms = ctx.saved_tensors
        return rows * _ratio(grad, norms)[..., None]

    @staticmethod
    def jvp(ctx, tangent):
        rows, norms = ctx.saved_tensors
        return _ratio((rows * tangent).sum(-1), norms)


def _ratio(numerator, norms):
    """``numerator / norms``, 0 where a norm is 0 (the derivative of a norm at the origin)."""
    return (numerator / norms).masked_fill(norms == 0, 0)


def cosine_logits(q_rows, k_rows):
    """Cosine similarity of every q row with every k row: ``(..., c, N), (..., c, N) -> (..., c, c)``.

    Without gradients (inference) exactly as the release: normalise the rows, then one
    (c x N) @ (N x c) product. The logits are sums over every pixel and the release's float32
    rounding of them is visible in the output (up to 1e-5 on a megapixel image), so parity needs
    this order. With gradients (training), the (c x c) product is divided by the two norms
    instead: the same values up to rounding, but its derivatives are one product and one row
    scaling per map instead of the several passes over both maps that differentiating the
    normalisation takes (~10% of a training step, ~20% of a double backward).
    """
    if records_graph(q_rows, k_rows):
        norm_q, norm_k = (_RowNorms.apply(rows).clamp_min(1e-12) for rows in (q_rows, k_rows))
        # q k^T as a bilinear product whose gradients come back contiguous for both factors
        # (autograd's matmul hands k a transposed one, which then meets k's contiguous norm gradient)
        products = per_image_pointwise(q_rows.flatten(0, -3), k_rows.flatten(0, -3)).view(
            *q_rows.shape[:-1], k_rows.shape[-2])
        return products / (norm_q[..., :, None] * norm_k[..., None, :])
    return F.normalize(q_rows, dim=-1) @ F.normalize(k_rows, dim=-1).transpose(-2, -1)


def channel_attention(q, k, v, temperature, projection, skip):
    """``skip`` plus multi-head transposed attention with the output projection folded in.

    Per head h with c = C/heads channels, q, k, v are read as (c, HW) matrices;
    ``attn = softmax(norm(q) @ norm(k)^T * t_h)`` with rows L2-normalised over pixels, and the
    result is ``projection @ (attn @ v)`` (a 1x1 convolution).

    q, k, v: ``(B,C,H,W)``; temperature: ``(heads,1,1)``; projection: ``(Cout,C,1,1)``;
    skip: ``(B,Cout,H,W)``.
    Returns ``(B,Cout,H,W)`` channels-last.

    ``projection @ blockdiag(attn)`` is only ``(Cout, C)``, so applying attention and projection
    together costs one matmul over the pixels, with v read in place (channels-last).
    """
    batch, channels, height, width = q.shape
    heads = temperature.shape[0]
    per_head = channels // heads

    def head_rows(t):  # (B, heads, c, HW)
        return row_major_copy(t).view(batch, heads, per_head, height * width)

    attn = torch.softmax(cosine_logits(head_rows(q), head_rows(k)) * temperature, dim=-1)
    proj = projection.flatten(1).view(-1, heads, per_head)  # (Cout, heads, c_q)
    mixer = torch.einsum("ohi,bhij->bhjo", proj, attn).reshape(batch, channels, -1)  # (B, C, Cout)
    out = per_image_pointwise_add(pixel_rows(v), mixer.transpose(1, 2), pixel_rows(skip))
    return out.view(batch, height, width, -1).permute(0, 3, 1, 2)


class Attention(nn.Module):
    """Multi-Dconv head transposed self-attention (MDTA). ``(B,C,H,W) -> (B,C,H,W)``."""

    def __init__(self, dim, heads):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = PointwiseConv(dim, dim * 3)
        self.qkv_dwconv = DepthwiseConv(dim * 3)
        self.project_out = PointwiseConv(dim, dim)

    def forward(self, x, skip):
        """``skip + MDTA(x)``."""
        q, k, v = expand_parts_in_strips(x, self.qkv, self.qkv_dwconv, 3)
        return channel_attention(q, k, v, self.temperature, self.project_out.weight, skip)


class FeedForward(nn.Module):
    """Gated-Dconv feed-forward network (GDFN). ``(B,C,H,W) -> (B,C,H,W)``.

    1x1 to 2*hidden, depthwise 3x3, ``gelu(first half) * second half``, 1x1 back to C.
    """

    def __init__(self, dim, expansion):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = PointwiseConv(dim, hidden * 2)
        self.dwconv = DepthwiseConv(hidden * 2)
        self.project_out = PointwiseConv(hidden, dim)

    def forward(self, x, skip):
        """``skip + GDFN(x)``."""
        gate = expand_part(x, self.project_in, self.dwconv, 0, 2, gelu=True)
        value = expand_part(x, self.project_in, self.dwconv, 1, 2)
        return pointwise_conv_add(gate_product(gate, value), self.project_out.weight, skip)


class TransformerBlock(nn.Module):
    """Pre-norm Restormer block: ``x + MDTA(LN(x))`` then ``x + GDFN(LN(x))``. Shape-preserving."""

    def __init__(self, dim, heads, expansion):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = FeedForward(dim, expansion)

    def forward(self, x):
        x = self.attn(self.norm1(x), x)
        return in_strips(lambda t: self.ffn(self.norm2(t), t), x)


def _blocks(count, dim, heads, expansion):
    return nn.ModuleList(TransformerBlock(dim, heads, expansion) for _ in range(count))


class CrossAttentionMerge(nn.Module):
    """Merges the two source branches. ``(B,C,H,W), (B,C,H,W) -> (B,2C,H,W)``.

    Cross attention: branch 1 is updated with the attention of branch 2's queries over branch 1's
    keys/values, and vice versa (residual, 1x1 projections). The concatenation ``m`` then gates a
    per-branch expansion: ``m + P1(gelu(g1) * E1(x1)) + P2(gelu(g2) * E2(x2))`` with
    ``(g1, g2) = split(Dw(E(m)))``, E* being 1x1 to 4C followed by depthwise 3x3.
    """

    def __init__(self, dim, heads):
        super().__init__()
        self.temperature1 = nn.Parameter(torch.ones(heads, 1, 1))
        self.temperature2 = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv1 = PointwiseConv(dim, dim * 3)
        self.qkv1_dwconv = DepthwiseConv(dim * 3)
        self.qkv2 = PointwiseConv(dim, dim * 3)
        self.qkv2_dwconv = DepthwiseConv(dim * 3)
        self.project_mid1 = PointwiseConv(dim, dim)
        self.project_mid2 = PointwiseConv(dim, dim)
        self.project_E = PointwiseConv(dim * 2, dim * 8)
        self.project_E_d = DepthwiseConv(dim * 8)
        self.project_E1 = PointwiseConv(dim, dim * 4)
        self.project_E1_d = DepthwiseConv(dim * 4)
        self.project_E2 = PointwiseConv(dim, dim * 4)
        self.project_E2_d = DepthwiseConv(dim * 4)
        self.project_out1 = PointwiseConv(dim * 4, dim * 2)
        self.project_out2 = PointwiseConv(dim * 4, dim * 2)

    def forward(self, x1, x2):
        q1, k1, v1 = expand_parts_in_strips(x1, self.qkv1, self.qkv1_dwconv, 3)
        q2, k2, v2 = expand_parts_in_strips(x2, self.qkv2, self.qkv2_dwconv, 3)
        x1 = channel_attention(q2, k1, v1, self.temperature1, self.project_mid1.weight, x1)
        x2 = channel_attention(q1, k2, v2, self.temperature2, self.project_mid2.weight, x2)
        return in_strips(self._expand, torch.cat([x1, x2], dim=1))

    def _expand(self, merged):
        out = merged
        branches = ((self.project_E1, self.project_E1_d, self.project_out1),
                    (self.project_E2, self.project_E2_d, self.project_out2))
        # one branch at a time, so only one branch's wide maps are alive (see expand_part)
        for part, (x, (expand, depthwise, project)) in enumerate(zip(merged.chunk(2, dim=1), branches)):
            gate = expand_part(merged, self.project_E, self.project_E_d, part, 2, gelu=True)
            value = depthwise(expand(x))
            out = pointwise_conv_add(gate_product(gate, value), project.weight, out)
        return out


class _SourceEncoders(nn.Module):
    """Per source: 3x3 conv stem 1->dim and ``num_blocks`` transformer blocks.

    ``(B,2,H,W) -> (B,dim,H,W), (B,dim,H,W)``. Shared by F and P (same attribute names as the
    release, so checkpoint keys match).
    """

    def __init__(self, dim, num_blocks, heads, expansion):
        super().__init__()
        self.project_in_1 = Conv2d(1, dim, 3)
        self.project_in_2 = Conv2d(1, dim, 3)
        self.encoder1 = _blocks(num_blocks, dim, heads, expansion)
        self.encoder2 = _blocks(num_blocks, dim, heads, expansion)

    def encode(self, x):
        x1 = self.project_in_1(x[:, :1])
        x2 = self.project_in_2(x[:, 1:])
        for block in self.encoder1:
            x1 = block(x1)
        for block in self.encoder2:
            x2 = block(x2)
        return x1, x2


class ReFusion(_SourceEncoders):
    """Fusion module F. ``(B,2,H,W)`` in [0,1] (two Y channels) -> ``(B,1,H,W)`` in (0,1).

    Per source: 3x3 conv 1->dim and ``num_blocks`` transformer blocks; cross-attention merge to
    2*dim; ``num_blocks`` decoder blocks; 3x3 conv 2*dim->dim, LeakyReLU(0.01), 3x3 conv dim->1,
    sigmoid. Defaults are the released configuration; attribute names follow the release so its
    checkpoints load with ``load_state_dict`` (see ARCHITECTURE.md).
    """

    def __init__(self, dim=16, num_blocks=2, heads=8, ffn_expansion_factor=2):
        super().__init__(dim, num_blocks, heads, ffn_expansion_factor)
        self.FM = CrossAttentionMerge(dim, heads)
        self.decoder = _blocks(num_blocks, dim * 2, heads, ffn_expansion_factor)
        self.project_out_0 = Conv2d(dim * 2, dim, 3)
        self.project_out_1 = Conv2d(dim, 1, 3)

    def forward(self, x):
        out = self.FM(*self.encode(x))
        for block in self.decoder:
            out = block(out)
        out = F.leaky_relu(self.project_out_0(out), 0.01)
        return torch.sigmoid(self.project_out_1(out)).contiguous()


class LPN(_SourceEncoders):
    """Loss proposal module P. ``(B,2,H,W)`` -> ``(w_int, w_grad)``, each ``(B,2,H,W)``.

    Per source: 3x3 stem and ``num_blocks`` blocks; concatenation; ``num_blocks`` blocks at 2*dim;
    3x3 conv 2*dim->dim, PReLU, 3x3 conv dim->4. Channels 0-1 and 2-3 each go through a softmax
    over the two sources, so at every pixel ``w[:,0] + w[:,1] = 1``.
    """

    def __init__(self, dim=16, num_blocks=2, heads=8, ffn_expansion_factor=2):
        super().__init__(dim, num_blocks, heads, ffn_expansion_factor)
        self.decoder = _blocks(num_blocks, dim * 2, heads, ffn_expansion_factor)
        self.project_out_0 = Conv2d(dim * 2, dim, 3)
        self.act = nn.PReLU()
        self.project_out_1 = Conv2d(dim, 4, 3)

    def forward(self, x, exchanged=False):
        """``exchanged=True``: ``x`` is an input-exchanged batch (``utils.meta.exchange``: the
        pairs as (A,B), then the same pairs as (B,A)). Each source's logits are then averaged
        over its two positions, so the second half's weights are exactly the first half's with
        the sources swapped: P cannot favour an input for its position. Not in the release.
        """
        out = torch.cat(self.encode(x), dim=1)
        for block in self.decoder:
            out = block(out)
        logits = self.project_out_1(self.act(self.project_out_0(out))).contiguous()
        if exchanged:
            swap = [1, 0, 3, 2]  # (int_A, int_B, grad_A, grad_B) -> the other source order
            as_given, swapped = logits.chunk(2)
            first = (as_given + swapped[:, swap]) / 2
            logits = torch.cat([first, first[:, swap]])
        return torch.softmax(logits[:, :2], dim=1), torch.softmax(logits[:, 2:], dim=1)


class ReN(nn.Module):
    """Reconstruction module R. Fused ``(B,1,H,W)`` -> both sources ``(B,2,H,W)`` in (0,1).

    Deliberately light (3x3 stem 1->dim, ``num_blocks`` blocks, 3x3 conv dim->dim, PReLU,
    3x3 conv dim->2, sigmoid): R must not be able to reconstruct the sources from a fused image
    that dropped their content, or its loss would stop rewarding F for keeping it.
    """

    def __init__(self, dim=16, num_blocks=2, heads=8, ffn_expansion_factor=2):
        super().__init__()
        self.project_in = Conv2d(1, dim, 3)
        self.blocks = _blocks(num_blocks, dim, heads, ffn_expansion_factor)
        self.project_out_0 = Conv2d(dim, dim, 3)
        self.act = nn.PReLU()
        self.project_out_1 = Conv2d(dim, 2, 3)

    def forward(self, fused):
        out = self.project_in(fused)
        for block in self.blocks:
            out = block(out)
        return torch.sigmoid(self.project_out_1(self.act(self.project_out_0(out)))).contiguous()
