"""ReFusion's three networks (Bai et al., IJCV 2024), built from Restormer blocks.

* ``ReFusion`` -- the fusion module F: two Y channels ``(B,2,H,W)`` -> fused ``(B,1,H,W)``.
* ``LPN``      -- the loss proposal module P: per-pixel weights of F's intensity/gradient loss.
* ``ReN``      -- the reconstruction module R: fused ``(B,1,H,W)`` -> both sources ``(B,2,H,W)``.

Parameters are ordinary ``nn.Parameter`` attributes read through ``self``, so
``torch.func.functional_call(net, params, x)`` runs a network with substituted parameters (the
virtual steps of meta-learning).

Where the fast and the tiled paths hook in:

* every convolution, the channel attention and the gated products are calls to the primitives of
  ``utils.kernels``, which pick fast exact kernels (channels-last oneDNN convolutions, strips,
  folded projections; ``utils/kernels/README.md``). ``REFUSION_PLAIN_KERNELS=1`` sends them all
  to their plain lines (``utils/kernels/plain.py``); ``ReFusion_plain.py`` is the whole network
  written the release's plain way.
* the exact tiled evaluation of any image size (``utils.tiled``) enters through the attention
  primitives alone (``head_attention`` / ``project_attended`` defer to its
  ``ATTENTION_OVERRIDE``) and by running blocks tile by tile; nothing here changes for it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.kernels import (conv_part, conv_parts, depthwise_conv3x3, gated_product, head_attention,
                           in_strips, pointwise_conv, project_attended)


def _release_conv_key_hook(module, state_dict, prefix, *_):
    """Accept the authors' checkpoints, which store each conv weight twice (``x.weight`` and
    ``x.conv.weight``, the same tensor); one key is kept after checking that both agree."""
    duplicate = state_dict.pop(prefix + "conv.weight", None)
    if duplicate is None:
        return
    if prefix + "weight" not in state_dict:
        state_dict[prefix + "weight"] = duplicate
    elif not torch.equal(state_dict[prefix + "weight"], duplicate):
        raise RuntimeError(f"checkpoint keys {prefix}weight and {prefix}conv.weight disagree")


class Conv2d(nn.Conv2d):
    """Bias-free, zero-padded ``nn.Conv2d`` with channels-last output."""

    def __init__(self, in_channels, out_channels, kernel_size, groups=1):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                         groups=groups, bias=False)
        self.register_load_state_dict_pre_hook(_release_conv_key_hook)

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x).contiguous(memory_format=torch.channels_last)


class PointwiseConv(Conv2d):
    """1x1 convolution ``(B,Cin,H,W) -> (B,Cout,H,W)``."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x):
        return pointwise_conv(x, self.weight)


class DepthwiseConv(Conv2d):
    """Depthwise 3x3 convolution ``(B,C,H,W) -> (B,C,H,W)``."""

    def __init__(self, channels):
        super().__init__(channels, channels, 3, groups=channels)

    def forward(self, x):
        return depthwise_conv3x3(x, self.weight)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of ``(B,C,H,W)``, with bias (Restormer's "WithBias")."""

    def __init__(self, dim):
        super().__init__()
        self.body = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x):
        pixels = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return self.body(pixels).permute(0, 3, 1, 2)


class Attention(nn.Module):
    """Multi-Dconv head transposed attention (MDTA), ``(B,C,H,W) -> (B,C,H,W)``:
    ``q, k, v = Dw(P(x))``; per head ``softmax(norm(q) norm(k)^T * t) v``; 1x1 projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = PointwiseConv(dim, dim * 3)
        self.qkv_dwconv = DepthwiseConv(dim * 3)
        self.project_out = PointwiseConv(dim, dim)

    def forward(self, x):
        q, k, v = conv_parts(x, self.qkv, self.qkv_dwconv, 3)
        attn = head_attention(q, k, self.temperature)
        return project_attended(attn, v, self.project_out.weight)


class FeedForward(nn.Module):
    """Gated-Dconv feed-forward network (GDFN), ``(B,C,H,W) -> (B,C,H,W)``:
    ``gate, value = Dw(P_in(x))``; ``P_out(gelu(gate) * value)``."""

    def __init__(self, dim, expansion):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = PointwiseConv(dim, hidden * 2)
        self.dwconv = DepthwiseConv(hidden * 2)
        self.project_out = PointwiseConv(hidden, dim)

    def forward(self, x):
        gate = conv_part(x, self.project_in, self.dwconv, 0, 2, gelu=True)
        value = conv_part(x, self.project_in, self.dwconv, 1, 2)
        return self.project_out(gated_product(gate, value))


class TransformerBlock(nn.Module):
    """Pre-norm Restormer block: ``x + MDTA(LN(x))``, then ``x + GDFN(LN(x))``."""

    def __init__(self, dim, heads, expansion):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = FeedForward(dim, expansion)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return in_strips(lambda t: t + self.ffn(self.norm2(t)), x)


def _blocks(count, dim, heads, expansion):
    return nn.ModuleList(TransformerBlock(dim, heads, expansion) for _ in range(count))


class CrossAttentionMerge(nn.Module):
    """Merges the two source branches, ``(B,C,H,W), (B,C,H,W) -> (B,2C,H,W)``.

    Cross attention: branch 1 is updated with the attention of branch 2's queries over branch 1's
    keys and values, and vice versa. The concatenation ``m`` then gates an expansion of each
    branch: ``m + P1(gelu(g1) * E1(x1)) + P2(gelu(g2) * E2(x2))``, ``(g1, g2) = Dw(E(m))``,
    each E* a 1x1 convolution to 4C followed by a depthwise 3x3.
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
        q1, k1, v1 = conv_parts(x1, self.qkv1, self.qkv1_dwconv, 3)
        q2, k2, v2 = conv_parts(x2, self.qkv2, self.qkv2_dwconv, 3)
        attn1 = head_attention(q2, k1, self.temperature1)
        attn2 = head_attention(q1, k2, self.temperature2)
        x1 = x1 + project_attended(attn1, v1, self.project_mid1.weight)
        x2 = x2 + project_attended(attn2, v2, self.project_mid2.weight)
        return in_strips(self.gated_expansion, torch.cat([x1, x2], dim=1))

    def gated_expansion(self, m):
        """``m + P1(gelu(g1) * E1(x1)) + P2(gelu(g2) * E2(x2))``, one branch at a time so that
        only one branch's wide maps are alive."""
        branches = ((self.project_E1, self.project_E1_d, self.project_out1),
                    (self.project_E2, self.project_E2_d, self.project_out2))
        out = m
        for part, (x, (expand, spatial, project)) in enumerate(zip(m.chunk(2, dim=1), branches)):
            gate = conv_part(m, self.project_E, self.project_E_d, part, 2, gelu=True)
            out = out + project(gated_product(gate, spatial(expand(x))))
        return out


class SourceEncoders(nn.Module):
    """Per source, a 3x3 stem 1->dim and ``num_blocks`` transformer blocks:
    ``(B,2,H,W) -> (B,dim,H,W), (B,dim,H,W)``. The first half of both F and P."""

    def __init__(self, dim, num_blocks, heads, expansion):
        super().__init__()
        self.project_in_1 = Conv2d(1, dim, 3)
        self.project_in_2 = Conv2d(1, dim, 3)
        self.encoder1 = _blocks(num_blocks, dim, heads, expansion)
        self.encoder2 = _blocks(num_blocks, dim, heads, expansion)

    def encode(self, x):
        x1, x2 = self.project_in_1(x[:, :1]), self.project_in_2(x[:, 1:])
        for block in self.encoder1:
            x1 = block(x1)
        for block in self.encoder2:
            x2 = block(x2)
        return x1, x2


class ReFusion(SourceEncoders):
    """Fusion module F: ``(B,2,H,W)`` in [0,1] (two Y channels) -> ``(B,1,H,W)`` in (0,1).

    Encoders; cross-attention merge to 2*dim; ``num_blocks`` decoder blocks; 3x3 conv 2*dim->dim,
    LeakyReLU(0.01), 3x3 conv dim->1, sigmoid. Defaults and attribute names are the release's, so
    its checkpoints load with ``load_state_dict``.
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


class LPN(SourceEncoders):
    """Loss proposal module P: ``(B,2,H,W)`` -> ``(w_int, w_grad)``, each ``(B,2,H,W)``.

    Encoders; concatenation; ``num_blocks`` blocks at 2*dim; 3x3 conv 2*dim->dim, PReLU, 3x3 conv
    dim->4. Channels 0-1 and 2-3 each go through a softmax over the two sources, so at every pixel
    ``w[:,0] + w[:,1] = 1``.
    """

    def __init__(self, dim=16, num_blocks=2, heads=8, ffn_expansion_factor=2):
        super().__init__(dim, num_blocks, heads, ffn_expansion_factor)
        self.decoder = _blocks(num_blocks, dim * 2, heads, ffn_expansion_factor)
        self.project_out_0 = Conv2d(dim * 2, dim, 3)
        self.act = nn.PReLU()
        self.project_out_1 = Conv2d(dim, 4, 3)

    def forward(self, x, exchanged=False):
        """``exchanged=True``: ``x`` is an input-exchanged batch (``utils.meta.exchange``: the
        pairs as (A,B), then as (B,A)). Each source's logits are then averaged over its two
        positions, so the second half's weights are the first half's with the sources swapped:
        P cannot favour an input for its position. Not in the release.
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
    """Reconstruction module R: fused ``(B,1,H,W)`` -> both sources ``(B,2,H,W)`` in (0,1).

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
