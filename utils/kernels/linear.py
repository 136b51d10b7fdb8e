"""The linear maps of ReFusion's blocks, with derivatives of any order that are again such maps.

PyTorch's own double backward of these is slow on CPU: for a grouped (depthwise) convolution it
loops over the groups (about 1,300 convolution calls and 3,000 copies for one double backward of
ReFusion), and for a 1x1 convolution or a ``bmm`` it works on batch-transposed NCHW copies of the
maps and hands NCHW gradients to everything upstream.

All three maps here are bilinear, ``y = product(x, w)``, and share one algebra. For an incoming
``g = dL/dy``:

* ``dL/dx = product(g, transpose(w))``
* ``dL/dw = gram(g, x)``

and the weight gradient's own derivatives, for an incoming ``G = dL/d(dL/dw)``, are
``d/dg = product(x, G)`` and ``d/dx = product(g, transpose(G))``. Each is computed through the
same two autograd Functions, so derivatives of any order stay in the same kind of map:

* depthwise 3x3 correlation, zero padding: ``transpose`` flips the kernel, ``gram`` sums
  ``g * shifted x`` over batch and pixels (one ``convolution_backward``);
* 1x1 convolution, one ``(Cout,Cin,1,1)`` weight: with pixels as rows ``y = x W^T``,
  ``transpose`` swaps the channel axes, ``gram = g^T x`` over all pixels;
* the same with one ``(Cout,Cin)`` weight per image, on pixel rows ``(B,N,Cin)`` (the
  attention's folded mixing matrix): batched GEMMs.

Every map these functions return is channels-last (pixel rows), the layout oneDNN's fast kernels
want.
"""
import torch
import torch.nn.functional as F
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.autograd import forward_ad

CHANNELS_LAST = torch.channels_last


def _convolution_weight_gradient(grad_out, x, weight_shape, padding, groups):
    weight_like = x.new_empty(weight_shape)  # only its shape is read
    return torch.ops.aten.convolution_backward(
        grad_out.contiguous(memory_format=CHANNELS_LAST), x.contiguous(memory_format=CHANNELS_LAST),
        weight_like, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], groups,
        [False, True, False])[1]


class _Depthwise3x3:
    """``(B,C,H,W), (C,1,3,3) -> (B,C,H,W)``: oneDNN's depthwise kernel (~3x faster on
    channels-last data; gradients arrive in any layout)."""

    @staticmethod
    def product(x, weight):
        return F.conv2d(x.contiguous(memory_format=CHANNELS_LAST), weight, None, 1, 1, 1, weight.shape[0])

    @staticmethod
    def gram(grad_out, x):
        channels = x.shape[1]
        return _convolution_weight_gradient(grad_out, x, (channels, 1, 3, 3), 1, channels)

    @staticmethod
    def transpose(weight):
        return weight.flip(-1, -2)


class _SharedPointwise:
    """``(B,Cin,H,W), (Cout,Cin,1,1) -> (B,Cout,H,W)``: oneDNN's 1x1 convolution and its
    weight-gradient kernel (up to ~1.8x faster than the (Cout x BHW)(BHW x Cin) GEMM)."""

    @staticmethod
    def product(x, weight):
        x = x.contiguous(memory_format=CHANNELS_LAST)
        if _onednn_applies(x, weight):
            # With one thread and fewer than 16 images conv2d leaves oneDNN for PyTorch's own
            # GEMM, which is 2-5x slower on channels-last maps; oneDNN's result is the one
            # conv2d gives with two or more threads.
            return torch.mkldnn_convolution(x, weight, None, [0, 0], [1, 1], [1, 1], 1)
        return F.conv2d(x, weight)

    @staticmethod
    def gram(grad_out, x):
        return _convolution_weight_gradient(grad_out, x, (grad_out.shape[1], x.shape[1], 1, 1), 0, 1)

    @staticmethod
    def transpose(weight):
        return weight.transpose(0, 1)


class _PerImagePointwise:
    """``(B,N,Cin), (B,Cout,Cin) -> (B,N,Cout)``: batched GEMMs."""

    @staticmethod
    def product(x, weight):
        return x @ weight.transpose(-1, -2)

    @staticmethod
    def gram(grad_out, x):
        return grad_out.transpose(-1, -2) @ x

    @staticmethod
    def transpose(weight):
        return weight.transpose(-1, -2)


class _KindFunction(torch.autograd.Function):
    """Inputs ``(tensor, tensor, kind)``: saves both tensors and the kind."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.kind = inputs[2]
        ctx.save_for_backward(*inputs[:2])


class _Product(_KindFunction):
    """``y = product(x, w)``."""

    @staticmethod
    def forward(x, weight, kind):
        return kind.product(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        kind = ctx.kind
        grad_x = _apply(grad_out, kind.transpose(weight), kind) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # a plain backward skips the Function (overhead shows on 64 px crops)
            grad_w = (_Gram.apply(grad_out, x, kind) if torch.is_grad_enabled()
                      else kind.gram(grad_out, x))
        return grad_x, grad_w, None


class _Gram(_KindFunction):
    """``dL/dw = gram(g, x)``."""

    @staticmethod
    def forward(grad_out, x, kind):
        return kind.gram(grad_out, x)

    @staticmethod
    def backward(ctx, upstream):
        grad_out, x = ctx.saved_tensors
        kind = ctx.kind
        d_grad_out = _apply(x, upstream, kind) if ctx.needs_input_grad[0] else None
        d_x = _apply(grad_out, kind.transpose(upstream), kind) if ctx.needs_input_grad[1] else None
        return d_grad_out, d_x, None


def records_graph(*tensors):
    """Whether an operation on ``tensors`` would be recorded by autograd."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _apply(x, weight, kind):
    if records_graph(x, weight):
        return _Product.apply(x, weight, kind)
    return kind.product(x, weight)


def depthwise_conv3x3(x, weight):
    """Depthwise 3x3 correlation, zero padding 1: ``(B,C,H,W), (C,1,3,3) -> (B,C,H,W)``."""
    return _apply(x, weight, _Depthwise3x3)


def pointwise_conv(x, weight):
    """1x1 convolution without bias: ``(B,Cin,H,W), (Cout,Cin,1,1) -> (B,Cout,H,W)``."""
    return _apply(x, weight, _SharedPointwise)


def _carries_tangents(*tensors):
    """Whether forward-mode derivatives (``torch.func.jvp``, ``torch.autograd.forward_ad``) or
    another torch.func transform ride on any of ``tensors``: oneDNN's direct entry points have
    no forward-mode derivative (PyTorch silently drops the tangent), ``F.conv2d`` has."""
    return any(is_functorch_wrapped_tensor(t) or forward_ad.unpack_dual(t).tangent is not None
               for t in tensors)


def _onednn_applies(x, *others):
    """Whether oneDNN's direct entry points may be called: float32 on CPU, oneDNN present and not
    switched off (``torch.backends.mkldnn.flags(enabled=False)``), no forward-mode tangent."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not _carries_tangents(x, *others))


def _fusable(x, *others):
    """Whether oneDNN post-op fusion applies: no autograd graph to record and oneDNN applies."""
    return not records_graph(x, *others) and _onednn_applies(x, *others)


def depthwise_conv3x3_gelu(x, weight):
    """``gelu(depthwise_conv3x3(x, weight))`` with the exact (erf) GELU.

    Without autograd on CPU this is one oneDNN convolution with the GELU as its post-op, which
    saves a pass over the (widest) maps; oneDNN's erf differs from PyTorch's by float32 rounding
    (max |diff| ~5e-7 on values ~5).
    """
    if _fusable(x, weight):
        return torch.ops.mkldnn._convolution_pointwise(
            x.contiguous(memory_format=CHANNELS_LAST), weight, None, [1, 1], [1, 1], [1, 1],
            weight.shape[0], "gelu", [], "none")
    return F.gelu(depthwise_conv3x3(x, weight))


def per_image_pointwise(rows, weight):
    """A different 1x1 convolution per image, on pixel rows: ``(B,N,Cin), (B,Cout,Cin) -> (B,N,Cout)``."""
    return _apply(rows, weight, _PerImagePointwise)
