"""The two convolutions of ReFusion's blocks, with derivatives of any order in the same kind.

PyTorch's own double backward of these is slow on CPU: for a grouped (depthwise) convolution it
loops over the groups (about 1,300 convolution calls and 3,000 copies for one double backward of
ReFusion), and for a 1x1 convolution it convolves batch-transposed NCHW copies of the maps (about
0.7 s of copies per double backward) and hands NCHW gradients to everything upstream.

Depthwise 3x3. Written out, every derivative of a depthwise 3x3 correlation ``y = x ⋆ w`` is
again one:

* ``dL/dx = g ⋆ flip(w)``                (the transposed correlation, same padding)
* ``dL/dw[c,i,j] = sum_{b,h,w} g[b,c,h,w] x_pad[b,c,h+i,w+j]`` (one ``convolution_backward``)

and the weight gradient's own derivatives, for an incoming ``G = dL/d(dL/dw)``, are
``d/dg = x ⋆ G`` and ``d/dx = g ⋆ flip(G)``. Each is expressed with the functions below, so
derivatives of any order stay depthwise.

Pointwise (1x1). With pixels as rows, ``y = x W^T``; ``dL/dx = g W`` (a 1x1 convolution with
``W^T``), ``dL/dW = g^T x`` (one GEMM over all pixels), and for an incoming ``G = dL/d(dL/dW)``:
``d/dg = x G^T`` and ``d/dx = g G``, 1x1 convolutions again. The same algebra serves a weight
that differs per image (the attention's folded mixing matrix), where PyTorch's own double
backward of ``bmm`` would hand an NCHW-ordered gradient back to the channels-last map.

Every map these functions return is channels-last, the layout oneDNN's fast kernels want.
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
        grad_w = None
        if ctx.needs_input_grad[1]:  # a plain backward skips the Function's overhead (~7% at 64 px)
            grad_w = (_WeightGradient.apply(grad_out, x) if torch.is_grad_enabled()
                      else _weight_gradient(grad_out, x))
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


def _pixel_rows(x):
    """``(B,C,H,W)`` -> ``(B*H*W, C)``, a view of a channels-last map."""
    return x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class _SharedWeights:
    """One ``(Cout,Cin,1,1)`` weight for every image: oneDNN's 1x1 convolution."""

    @staticmethod
    def product(x, weight):
        return F.conv2d(x.contiguous(memory_format=torch.channels_last), weight)

    @staticmethod
    def gram(grad_out, x):
        # oneDNN's weight-gradient kernel: up to ~1.8x faster than the (Cout x BHW)(BHW x Cin) GEMM
        weight_like = x.new_empty((grad_out.shape[1], x.shape[1], 1, 1))  # only its shape is read
        return torch.ops.aten.convolution_backward(
            grad_out.contiguous(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last), weight_like, None, [1, 1], [0, 0],
            [1, 1], False, [0, 0], 1, [False, True, False])[1]

    @staticmethod
    def transpose(weight):
        return weight.transpose(0, 1)


class _PerImageWeights:
    """One ``(Cout,Cin)`` weight per image, for pixel rows ``(B,N,Cin)``: a batched GEMM."""

    @staticmethod
    def product(x, weight):
        return x @ weight.transpose(-1, -2)

    @staticmethod
    def gram(grad_out, x):
        return grad_out.transpose(-1, -2) @ x

    @staticmethod
    def transpose(weight):
        return weight.transpose(-1, -2)


class _Pointwise(torch.autograd.Function):
    """``y = x W^T`` per pixel, with ``kind`` one of the two weight kinds above."""

    @staticmethod
    def forward(x, weight, kind):
        return kind.product(x, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.kind = inputs[2]
        ctx.save_for_backward(*inputs[:2])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        kind = ctx.kind
        grad_x = _apply(grad_out, kind.transpose(weight), kind) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # through the Function only when recording a double backward
            grad_w = (_PointwiseWeightGradient.apply(grad_out, x, kind) if torch.is_grad_enabled()
                      else kind.gram(grad_out, x))
        return grad_x, grad_w, None


class _PointwiseWeightGradient(torch.autograd.Function):
    """``dW = g^T x`` summed over pixels (and, for shared weights, images)."""

    @staticmethod
    def forward(grad_out, x, kind):
        return kind.gram(grad_out, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.kind = inputs[2]
        ctx.save_for_backward(*inputs[:2])

    @staticmethod
    def backward(ctx, upstream):
        grad_out, x = ctx.saved_tensors
        kind = ctx.kind
        d_grad_out = _apply(x, upstream, kind) if ctx.needs_input_grad[0] else None
        d_x = _apply(grad_out, kind.transpose(upstream), kind) if ctx.needs_input_grad[1] else None
        return d_grad_out, d_x, None


def _apply(x, weight, kind):
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _Pointwise.apply(x, weight, kind)
    return kind.product(x, weight)


def pointwise_conv(x, weight):
    """1x1 convolution without bias: ``(B,Cin,H,W), (Cout,Cin,1,1) -> (B,Cout,H,W)`` channels-last."""
    return _apply(x, weight, _SharedWeights)


def per_image_pointwise(rows, weight):
    """A different 1x1 convolution per image, on pixel rows: ``(B,N,Cin), (B,Cout,Cin) -> (B,N,Cout)``."""
    return _apply(rows, weight, _PerImageWeights)
