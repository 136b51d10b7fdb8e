"""Depthwise 3x3 convolution (zero padding, stride 1) whose derivatives are depthwise convolutions.

PyTorch's double backward of a grouped convolution on CPU loops over the groups (about 1,300
convolution calls and 3,000 copies for one double backward of ReFusion). Written out, every
derivative of a depthwise 3x3 correlation ``y = x ⋆ w`` is again one:

* ``dL/dx = g ⋆ flip(w)``                (the transposed correlation, same padding)
* ``dL/dw[c,i,j] = sum_{b,h,w} g[b,c,h,w] x_pad[b,c,h+i,w+j]`` (one ``convolution_backward``)

and the weight gradient's own derivatives, for an incoming ``G = dL/d(dL/dw)``, are
``d/dg = x ⋆ G`` and ``d/dx = g ⋆ flip(G)``. Each is expressed with the functions below, so
derivatives of any order stay depthwise.
"""
import torch
import torch.nn.functional as F


def _correlate(x, weight):
    # oneDNN's depthwise kernel is ~3x faster on channels-last data; gradients arrive in any layout
    x = x.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight, None, 1, 1, 1, weight.shape[0])


def _weight_gradient(grad_out, x):
    channels = x.shape[1]
    weight_like = x.new_empty((channels, 1, 3, 3))  # only its shape is read
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight_like, None, [1, 1], [1, 1], [1, 1], False, [0, 0], channels,
        [False, True, False])[1]


class _Depthwise(torch.autograd.Function):
    """``y = x ⋆ w``: ``(B,C,H,W), (C,1,3,3) -> (B,C,H,W)``."""

    @staticmethod
    def forward(x, weight):
        return _correlate(x, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = depthwise_conv3x3(grad_out, weight.flip(-1, -2)) if ctx.needs_input_grad[0] else None
        grad_w = _WeightGradient.apply(grad_out, x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


class _WeightGradient(torch.autograd.Function):
    """``dw = sum over batch and pixels of g * shifted x``: ``(B,C,H,W), (B,C,H,W) -> (C,1,3,3)``."""

    @staticmethod
    def forward(grad_out, x):
        return _weight_gradient(grad_out, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, upstream):
        grad_out, x = ctx.saved_tensors
        d_grad_out = depthwise_conv3x3(x, upstream) if ctx.needs_input_grad[0] else None
        d_x = depthwise_conv3x3(grad_out, upstream.flip(-1, -2)) if ctx.needs_input_grad[1] else None
        return d_grad_out, d_x


def depthwise_conv3x3(x, weight):
    """Depthwise 3x3 correlation, zero padding 1: ``(B,C,H,W), (C,1,3,3) -> (B,C,H,W)``."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _Depthwise.apply(x, weight)
    return _correlate(x, weight)
