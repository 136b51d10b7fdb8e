"""utils.kernels.linear: the hand-written derivatives of the depthwise and pointwise convolutions
to second order, and the fused kernels' values."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from utils.kernels.linear import depthwise_conv3x3, depthwise_conv3x3_gelu, per_image_pointwise, pointwise_conv


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_first_and_second_derivatives_match_finite_differences(layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=g).contiguous(memory_format=layout)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, generator=g)
    x.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(depthwise_conv3x3, (x, w))
    assert torch.autograd.gradgradcheck(depthwise_conv3x3, (x, w))
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(pointwise_conv, (x, w))
    assert torch.autograd.gradgradcheck(pointwise_conv, (x, w))


def test_per_image_pointwise_derivatives_and_values():
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(2, 7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(per_image_pointwise, (rows, w))
    assert torch.autograd.gradgradcheck(per_image_pointwise, (rows, w))
    _assert_same_values_and_gradients(per_image_pointwise(rows, w), torch.bmm(rows, w.transpose(1, 2)), (rows, w))


def test_third_derivatives_match_finite_differences():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    for conv, w in ((depthwise_conv3x3, torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=g)),
                    (pointwise_conv, torch.randn(3, 2, 1, 1, dtype=torch.float64, generator=g))):
        w.requires_grad_()

        def second_derivative_probe(x, w):
            (gx, gw) = torch.autograd.grad((conv(x, w) ** 2).sum(), (x, w), create_graph=True)
            return torch.autograd.grad((gx ** 2).sum() + (gw ** 2).sum(), (x, w), create_graph=True)

        assert torch.autograd.gradcheck(second_derivative_probe, (x, w))


def _assert_same_values_and_gradients(ours, reference, inputs):
    assert torch.allclose(ours, reference, atol=1e-6)
    probe = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * probe).sum(), inputs)
    expected = torch.autograd.grad((reference * probe).sum(), inputs)
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, atol=1e-5)


def test_pointwise_matches_conv2d_and_its_gradients():
    x = torch.randn(2, 4, 7, 5, requires_grad=True)
    w = torch.randn(6, 4, 1, 1, requires_grad=True)
    _assert_same_values_and_gradients(pointwise_conv(x, w), F.conv2d(x, w), (x, w))


def test_matches_grouped_conv2d_and_its_gradients():
    x = torch.randn(2, 4, 7, 5, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    _assert_same_values_and_gradients(depthwise_conv3x3(x, w), F.conv2d(x, w, padding=1, groups=4), (x, w))


def test_inference_fusions_match_the_differentiable_path():
    """Without autograd the GELU runs fused (a oneDNN post-op) and 1x1 convolutions call oneDNN
    directly; with autograd they are the plain composition. Both must give the same values."""
    g = torch.Generator().manual_seed(3)
    layout = torch.channels_last
    x = torch.randn(2, 6, 9, 7, generator=g).contiguous(memory_format=layout)
    depthwise = torch.randn(6, 1, 3, 3, generator=g)
    pointwise = torch.randn(4, 6, 1, 1, generator=g)
    cases = [(depthwise_conv3x3_gelu, (x, depthwise), lambda x, w: F.gelu(F.conv2d(x, w, padding=1, groups=6)), 1e-6),
             # on one thread PyTorch's 1x1 conv2d leaves oneDNN for its own GEMM: other rounding
             (pointwise_conv, (x, pointwise), lambda x, w: F.conv2d(x, w), 1e-6)]
    for fn, inputs, reference, tolerance in cases:
        with torch.no_grad():
            fused = fn(*inputs)
        expected = reference(*inputs)
        assert fused.shape == expected.shape
        assert (fused - expected).abs().max() <= tolerance * expected.abs().max()
        tracked = [t.clone().requires_grad_() for t in inputs]
        differentiable = fn(*tracked)
        assert differentiable.grad_fn is not None
        assert (differentiable.detach() - expected).abs().max() <= 1e-6 * expected.abs().max()
        assert torch.autograd.gradcheck(fn, [t.double().requires_grad_() for t in inputs])


def test_forward_mode_derivatives_are_not_dropped_by_the_fused_kernels():
    """torch.func.jvp records no graph, so the fused (oneDNN) branches must not be taken there:
    their kernels have no forward-mode formula and PyTorch silently returned zero tangents."""
    g = torch.Generator().manual_seed(4)
    layout = torch.channels_last
    x = torch.randn(2, 6, 9, 7, generator=g).contiguous(memory_format=layout)
    depthwise, pointwise = torch.randn(6, 1, 3, 3, generator=g), torch.randn(4, 6, 1, 1, generator=g)
    cases = [(depthwise_conv3x3_gelu, lambda w: F.gelu(F.conv2d(x, w, padding=1, groups=6)), depthwise),
             (pointwise_conv, lambda w: F.conv2d(x, w), pointwise)]
    for fn, reference, weight in cases:
        tangent = torch.randn(weight.shape, generator=g)
        _, ours = torch.func.jvp(lambda w: fn(x, w), (weight,), (tangent,))
        _, expected = torch.func.jvp(reference, (weight,), (tangent,))
        assert expected.abs().max() > 1
        assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()
        with forward_ad.dual_level():
            ours = forward_ad.unpack_dual(fn(x, forward_ad.make_dual(weight, tangent))).tangent
        assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()


PLAIN_PROBE = """
import sys, torch
from ReFusion import LPN, ReFusion, ReN
from utils.kernels import PLAIN
torch.manual_seed(0)
x = torch.rand(2, 2, 40, 36)
out = {"plain": PLAIN}
for net in (ReFusion(), LPN(), ReN()):
    name = type(net).__name__
    inputs = x[:, :1] if name == "ReN" else x
    with torch.no_grad():
        first = net(inputs)
        out[name] = first[0] if isinstance(first, tuple) else first
    loss = sum(t.square().mean() for t in ((net(inputs),) if name != "LPN" else net(inputs)))
    out[name + "_grads"] = torch.autograd.grad(loss, list(net.parameters()))
torch.save(out, sys.argv[1])
"""


def test_plain_kernel_switch_gives_the_same_networks(tmp_path):
    """``REFUSION_PLAIN_KERNELS=1`` sends every primitive to its plain lines: F's, P's and R's
    outputs and parameter gradients equal the fast path's to 1e-5."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    results = {}
    for plain in ("0", "1"):
        path = tmp_path / f"{plain}.pt"
        subprocess.run([sys.executable, "-c", PLAIN_PROBE, str(path)], cwd=ROOT, check=True,
                       env={**os.environ, "REFUSION_PLAIN_KERNELS": plain})
        results[plain] = torch.load(path)
    fast, plain = results["0"], results["1"]
    assert not fast["plain"] and plain["plain"]
    for name in ("ReFusion", "LPN", "ReN"):
        assert (fast[name] - plain[name]).abs().max() <= 1e-5
        for a, b in zip(fast[name + "_grads"], plain[name + "_grads"]):
            assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
