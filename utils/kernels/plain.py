"""The plain lines of every primitive in this package: each one the expression its fast version
computes, in PyTorch's own layers and NCHW, the way the release writes it. ``REFUSION_PLAIN_KERNELS=1``
sends ``ReFusion.py`` here (``utils/kernels/__init__.py``); ``tests/test_kernels.py`` checks that
both paths give the same networks to 1e-5."""
import torch
import torch.nn.functional as F

from utils.kernels.attention import ATTENTION_OVERRIDE


def pointwise_conv(x, weight):
    return F.conv2d(x, weight)


def depthwise_conv3x3(x, weight):
    return F.conv2d(x, weight, padding=1, groups=weight.shape[0])


def conv_parts(x, pointwise, depthwise, parts):
    return depthwise_conv3x3(pointwise_conv(x, pointwise.weight), depthwise.weight).chunk(parts, dim=1)


def conv_part(x, pointwise, depthwise, part, parts, gelu=False):
    out = conv_parts(x, pointwise, depthwise, parts)[part]
    return F.gelu(out) if gelu else out


def in_strips(local_fn, x):
    return local_fn(x)


def gated_product(gate, value):
    return gate * value


def head_attention(q, k, temperature):
    override = ATTENTION_OVERRIDE.get()
    if override is not None:  # the exact tiled evaluation (utils.tiled) supplies the matrix
        return override.matrix(q, k, temperature)
    batch, channels, height, width = q.shape
    heads = temperature.shape[0]
    q, k = (F.normalize(t.reshape(batch, heads, channels // heads, height * width), dim=-1) for t in (q, k))
    return torch.softmax(q @ k.transpose(-2, -1) * temperature, dim=-1)


def project_attended(attn, v, projection):
    override = ATTENTION_OVERRIDE.get()
    if override is not None:
        override.before_use(attn)
    batch, channels, height, width = v.shape
    heads = attn.shape[1]
    attended = attn @ v.reshape(batch, heads, channels // heads, height * width)
    return F.conv2d(attended.reshape(batch, channels, height, width), projection)
