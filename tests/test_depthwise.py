"""The depthwise convolution's hand-written derivatives, to second order."""
import pytest
import torch
import torch.nn.functional as F

from utils.depthwise import depthwise_conv3x3


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_first_and_second_derivatives_match_finite_differences(layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=g).contiguous(memory_format=layout)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, generator=g)
    x.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(depthwise_conv3x3, (x, w))
    assert torch.autograd.gradgradcheck(depthwise_conv3x3, (x, w))


def test_matches_grouped_conv2d_and_its_gradients():
    x = torch.randn(2, 4, 7, 5, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    ours = depthwise_conv3x3(x, w)
    reference = F.conv2d(x, w, padding=1, groups=4)
    assert torch.allclose(ours, reference, atol=1e-6)
    probe = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * probe).sum(), (x, w))
    expected = torch.autograd.grad((reference * probe).sum(), (x, w))
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, atol=1e-5)
