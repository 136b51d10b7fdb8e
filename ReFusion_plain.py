"""The fusion network F written the plain way: the release's style, next to ``ReFusion.py``.

Same function and parameter names as ``ReFusion.ReFusion`` (it loads the same state dicts), but
as the authors' release writes it: default NCHW layout, every 1x1 and depthwise convolution an
``nn.Conv2d``, the channel LayerNorm computed by moving channels last and back, q/k/v split from
one tensor. It is the reference that reads like the paper and the speed baseline:
``bench/bench_inference.py --baseline`` times it next to ``ReFusion`` in one process, and
tests/test_model.py checks that both compute the same outputs. (``REFUSION_PLAIN_KERNELS=1``
instead keeps ``ReFusion`` and sends its primitives to their plain lines, ``utils/kernels/plain.py``.)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.kernels.plain import head_attention


def conv(in_channels, out_channels, kernel_size, groups=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                     groups=groups, bias=False)


class PlainLayerNorm(nn.Module):
    """LayerNorm over channels by moving them last: ``(B,C,H,W) -> (B,C,H,W)``."""

    def __init__(self, dim):
        super().__init__()
        self.body = nn.Module()
        self.body.weight = nn.Parameter(torch.ones(dim))
        self.body.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        mean = tokens.mean(-1, keepdim=True)
        variance = tokens.var(-1, keepdim=True, unbiased=False)
        normed = (tokens - mean) / torch.sqrt(variance + 1e-5) * self.body.weight + self.body.bias
        return normed.transpose(1, 2).reshape(batch, channels, height, width)


def attend(q, k, v, temperature):
    """Transposed attention over channels; q, k, v ``(B,C,H,W)`` -> ``(B,C,H,W)``."""
    batch, channels, height, width = v.shape
    attn = head_attention(q, k, temperature)  # (B, heads, c, c)
    out = attn @ v.reshape(batch, attn.shape[1], channels // attn.shape[1], height * width)
    return out.reshape(batch, channels, height, width)


class PlainAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = conv(dim, dim * 3, 1)
        self.qkv_dwconv = conv(dim * 3, dim * 3, 3, groups=dim * 3)
        self.project_out = conv(dim, dim, 1)

    def forward(self, x):
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return self.project_out(attend(q, k, v, self.temperature))


class PlainFeedForward(nn.Module):
    def __init__(self, dim, expansion):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = conv(dim, hidden * 2, 1)
        self.dwconv = conv(hidden * 2, hidden * 2, 3, groups=hidden * 2)
        self.project_out = conv(hidden, dim, 1)

    def forward(self, x):
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


class PlainBlock(nn.Module):
    def __init__(self, dim, heads, expansion):
        super().__init__()
        self.norm1 = PlainLayerNorm(dim)
        self.attn = PlainAttention(dim, heads)
        self.norm2 = PlainLayerNorm(dim)
        self.ffn = PlainFeedForward(dim, expansion)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PlainMerge(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.temperature1 = nn.Parameter(torch.ones(heads, 1, 1))
        self.temperature2 = nn.Parameter(torch.ones(heads, 1, 1))
        for branch in ("1", "2"):
            setattr(self, "qkv" + branch, conv(dim, dim * 3, 1))
            setattr(self, f"qkv{branch}_dwconv", conv(dim * 3, dim * 3, 3, groups=dim * 3))
            setattr(self, "project_mid" + branch, conv(dim, dim, 1))
            setattr(self, "project_E" + branch, conv(dim, dim * 4, 1))
            setattr(self, f"project_E{branch}_d", conv(dim * 4, dim * 4, 3, groups=dim * 4))
            setattr(self, "project_out" + branch, conv(dim * 4, dim * 2, 1))
        self.project_E = conv(dim * 2, dim * 8, 1)
        self.project_E_d = conv(dim * 8, dim * 8, 3, groups=dim * 8)

    def forward(self, x1, x2):
        q1, k1, v1 = self.qkv1_dwconv(self.qkv1(x1)).chunk(3, dim=1)
        q2, k2, v2 = self.qkv2_dwconv(self.qkv2(x2)).chunk(3, dim=1)
        x1 = x1 + self.project_mid1(attend(q2, k1, v1, self.temperature1))
        x2 = x2 + self.project_mid2(attend(q1, k2, v2, self.temperature2))
        merged = torch.cat([x1, x2], dim=1)
        gate1, gate2 = self.project_E_d(self.project_E(merged)).chunk(2, dim=1)
        branch1 = F.gelu(gate1) * self.project_E1_d(self.project_E1(x1))
        branch2 = F.gelu(gate2) * self.project_E2_d(self.project_E2(x2))
        return merged + self.project_out1(branch1) + self.project_out2(branch2)


class PlainReFusion(nn.Module):
    """``(B,2,H,W) -> (B,1,H,W)``, the function of ``ReFusion.ReFusion`` in plain NCHW."""

    def __init__(self, dim=16, num_blocks=2, heads=8, ffn_expansion_factor=2):
        super().__init__()

        def blocks(width):
            return nn.ModuleList(PlainBlock(width, heads, ffn_expansion_factor)
                                 for _ in range(num_blocks))

        self.project_in_1 = conv(1, dim, 3)
        self.project_in_2 = conv(1, dim, 3)
        self.encoder1 = blocks(dim)
        self.encoder2 = blocks(dim)
        self.FM = PlainMerge(dim, heads)
        self.decoder = blocks(dim * 2)
        self.project_out_0 = conv(dim * 2, dim, 3)
        self.project_out_1 = conv(dim, 1, 3)

    def forward(self, x):
        x1, x2 = self.project_in_1(x[:, :1]), self.project_in_2(x[:, 1:])
        for block1, block2 in zip(self.encoder1, self.encoder2):
            x1, x2 = block1(x1), block2(x2)
        out = self.FM(x1, x2)
        for block in self.decoder:
            out = block(out)
        return torch.sigmoid(self.project_out_1(F.leaky_relu(self.project_out_0(out), 0.01)))
