"""Channel ("transposed") attention of Restormer's MDTA: per head, a (c x c) softmax of the cosine
similarities of q's and k's channels over all pixels, applied to v, then the output projection.

Exact reformulations only: the projection is folded into the (c x c) attention so that both cost
one product over the pixels; pixel-row copies use OpenCV's blocked transpose on CPU.
"""
from contextvars import ContextVar

import cv2
import torch
import torch.nn.functional as F

from utils.kernels.linear import per_image_pointwise, records_graph

CHANNELS_LAST = torch.channels_last

# While set, ``head_attention`` hands its q, k and temperature to this object's ``matrix``, which
# returns the attention matrix, and ``project_attended`` shows it each matrix before using it
# (``before_use``): how ``utils.tiled`` evaluates the global attention exactly from tiles.
ATTENTION_OVERRIDE = ContextVar("attention_override", default=None)


def pixel_rows(x):
    """``(B,C,H,W) -> (B,H*W,C)``: a view of the map in channels-last memory (a copy only if
    ``x`` is not channels-last)."""
    batch, channels, height, width = x.shape
    return x.contiguous(memory_format=CHANNELS_LAST).permute(0, 2, 3, 1).reshape(
        batch, height * width, channels)


def row_major_copy(x):
    """NCHW copy of a channels-last map: ``(B,C,H,W) -> (B,C,H*W)`` contiguous.

    Differentiable to any order; its gradient goes back channels-last, the layout of the
    convolutions upstream.
    """
    return transpose_copy(pixel_rows(x))


def transpose_copy(x):
    """``(B,R,S) -> (B,S,R)`` contiguous copy; its gradient is the same copy of the gradient.

    On CPU the copy is OpenCV's cache-blocked transpose: on the attention's pixel-row maps
    (16-32 channels) 1.4-3x faster than a strided ``.contiguous()`` or an identity GEMM.
    Exact, being a copy.
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


class RowNorms(torch.autograd.Function):
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
        norm_q, norm_k = (RowNorms.apply(rows).clamp_min(1e-12) for rows in (q_rows, k_rows))
        # q k^T as a bilinear product whose gradients come back contiguous for both factors
        products = per_image_pointwise(q_rows.flatten(0, -3), k_rows.flatten(0, -3)).view(
            *q_rows.shape[:-1], k_rows.shape[-2])
        return products / (norm_q[..., :, None] * norm_k[..., None, :])
    return F.normalize(q_rows, dim=-1) @ F.normalize(k_rows, dim=-1).transpose(-2, -1)


def head_attention(q, k, temperature):
    """``softmax(norm(q) norm(k)^T * t_h)`` per head: ``(B,C,H,W), (B,C,H,W), (heads,1,1)`` ->
    ``(B,heads,c,c)`` with ``c = C/heads``, rows of q and k L2-normalised over all pixels."""
    override = ATTENTION_OVERRIDE.get()
    if override is not None:
        return override.matrix(q, k, temperature)
    batch, channels, height, width = q.shape
    heads = temperature.shape[0]

    def head_rows(t):  # (B, heads, c, HW)
        return row_major_copy(t).view(batch, heads, channels // heads, height * width)

    return torch.softmax(cosine_logits(head_rows(q), head_rows(k)) * temperature, dim=-1)


def project_attended(attn, v, projection):
    """``projection(attn @ v)``, one 1x1 convolution of the attended values:
    ``(B,heads,c,c), (B,C,H,W), (Cout,C,1,1) -> (B,Cout,H,W)`` channels-last.

    ``projection @ blockdiag(attn)`` is only ``(Cout, C)``, so attention and projection together
    cost one product over the pixels, with v read in place (channels-last).
    """
    override = ATTENTION_OVERRIDE.get()
    if override is not None:
        override.before_use(attn)
    batch, channels, height, width = v.shape
    heads = attn.shape[1]
    proj = projection.flatten(1).view(-1, heads, channels // heads)  # (Cout, heads, c)
    mixer = torch.einsum("ohi,bhij->bhjo", proj, attn).reshape(batch, channels, -1)  # (B, C, Cout)
    out = per_image_pointwise(pixel_rows(v), mixer.transpose(1, 2))
    return out.view(batch, height, width, -1).permute(0, 3, 1, 2)
