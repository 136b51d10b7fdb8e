"""Second-order meta-gradient of P, stage 2 and input exchange."""
from dataclasses import replace

import pytest
import torch
from torch.func import functional_call

from ReFusion import LPN, ReFusion, ReN
from utils.losses import fusion_loss, gradient_map, reconstruction_loss
from utils.meta import (LossWeights, LPNUpdate, exchange, fusion_step, lpn_meta_gradient,
                        meta_outer_loss, pair_coefficients, params, reconstruction_targets)


def tiny_networks(dtype=torch.float64):
    torch.manual_seed(0)
    nets = [cls(dim=4, num_blocks=1, heads=2).to(dtype) for cls in (ReFusion, ReN, LPN)]
    return nets


def batches(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(2, 2, 8, 8, generator=g, dtype=dtype),
            torch.rand(2, 2, 8, 8, generator=g, dtype=dtype))


def test_lpn_meta_gradient_matches_finite_difference():
    fusion, recon, lpn = tiny_networks()
    inner, outer = batches()
    weights, alpha = LossWeights(fusion_grad=0.5), 0.5  # large alpha: a strong second-order path
    _, grads = lpn_meta_gradient(fusion, recon, lpn, inner, outer, alpha, weights)
    assert_matches_finite_difference(fusion, recon, lpn, inner, outer, alpha, weights, grads)


def assert_matches_finite_difference(fusion, recon, lpn, inner, outer, alpha, weights, grads,
                                     coefficients=(1.0, 0.0)):
    """P's gradient along a random direction equals a central difference of the outer loss."""
    base = {k: v.detach() for k, v in params(lpn).items()}
    direction = {k: torch.randn_like(v) for k, v in base.items()}
    analytic = sum((g * direction[k]).sum() for k, g in zip(base, grads))

    def loss_at(t):
        moved = {k: (base[k] + t * direction[k]).requires_grad_() for k in base}
        return meta_outer_loss(fusion, recon, lpn, moved, inner, outer, alpha, weights, coefficients).detach()

    eps = 1e-5
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-8
    assert abs(analytic - numeric) <= 1e-4 * abs(numeric)


def test_float32_forward_mode_product_of_f_matches_the_plain_network():
    """P's meta-gradient rests on F's Jacobian-vector product; in float32 on CPU F's layers have
    fused inference kernels that must not be used for it (they dropped a quarter of it once).
    ReFusion_plain.py's network, built only from PyTorch's own layers, is the reference."""
    from ReFusion_plain import PlainReFusion
    torch.manual_seed(0)
    fusion = ReFusion()
    plain = PlainReFusion()
    plain.load_state_dict(fusion.state_dict())
    x = torch.rand(2, 2, 24, 20)
    point = {k: v.detach() for k, v in fusion.named_parameters()}
    direction = {k: torch.randn_like(v) for k, v in point.items()}
    tangents = [torch.func.jvp(lambda p, net=net: functional_call(net, p, (x,)), (point,), (direction,))[1]
                for net in (fusion, plain)]
    assert (tangents[0] - tangents[1]).norm() <= 1e-5 * tangents[1].norm()


def test_meta_gradient_is_only_the_reconstruction_signal():
    """Zero step size: F' = F, so the outer loss no longer depends on P at all."""
    fusion, recon, lpn = tiny_networks()
    inner, outer = batches()
    _, grads = lpn_meta_gradient(fusion, recon, lpn, inner, outer, 0.0, LossWeights())
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_lpn_update_sums_each_group_then_moves_the_largest_gradient_by_lr():
    """Groups of two pairs: the first pair only accumulates; the second steps P by exactly
    ``lr * (g1 + g2) / max|g1 + g2|``; a last, short group (pair 3 of 3) steps on its own."""
    _, _, lpn = tiny_networks()
    update = LPNUpdate(lpn, accumulation_steps=2)
    before = [p.detach().clone() for p in lpn.parameters()]
    first, second = ([torch.randn_like(p) for p in lpn.parameters()] for _ in range(2))
    assert not update.add(first, 0, 3, lr=0.1)
    assert all(torch.equal(b, p) for b, p in zip(before, lpn.parameters()))
    assert update.add(second, 1, 3, lr=0.1) and update.pending is None
    total = [a + b for a, b in zip(first, second)]
    scale = max(g.abs().max() for g in total)
    for b, p, g in zip(before, lpn.parameters(), total):
        assert torch.allclose(b - 0.1 * g / scale, p.detach(), rtol=0, atol=1e-12)
    moves = [(b - p.detach()).abs().max() for b, p in zip(before, lpn.parameters())]
    assert torch.isclose(max(moves), torch.tensor(0.1, dtype=moves[0].dtype))
    assert update.add(first, 2, 3, lr=0.1)


def test_stage_two_updates_f_and_r_but_not_lpn():
    fusion, recon, lpn = tiny_networks(torch.float32)
    inner, _ = batches(torch.float32)
    snapshot = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in
                (("F", fusion), ("R", recon), ("P", lpn))}
    opt_f = torch.optim.Adam(fusion.parameters(), 1e-3)
    opt_r = torch.optim.Adam(recon.parameters(), 1e-3)
    loss_f, loss_r = fusion_step(fusion, recon, lpn, inner, LossWeights(), opt_f, opt_r)
    assert loss_f > 0 and loss_r > 0
    assert all(torch.equal(v, snapshot["P"][k]) for k, v in lpn.state_dict().items())
    assert all(p.grad is None for p in lpn.parameters())
    for name, module in (("F", fusion), ("R", recon)):
        assert any(not torch.equal(v, snapshot[name][k]) for k, v in module.state_dict().items())


def test_input_exchange_swaps_inputs_but_keeps_targets():
    batch = torch.rand(3, 2, 4, 4)
    inputs, targets = exchange(batch), reconstruction_targets(batch)
    assert torch.equal(inputs[:3], batch)
    assert torch.equal(inputs[3:, 0], batch[:, 1]) and torch.equal(inputs[3:, 1], batch[:, 0])
    assert torch.equal(targets[:3], batch) and torch.equal(targets[3:], batch)


def test_gradient_map_of_a_vertical_edge():
    image = torch.zeros(1, 1, 5, 5)
    image[..., 2:] = 1
    grad = gradient_map(image)[0, 0]
    assert torch.equal(grad[1:4, :4], torch.tensor([[0., 4, 4, 0]]).expand(3, 4))  # Sobel_x = 4 at the step
    assert grad[0, 2] == 6  # top row: plus |Sobel_y| = 2 from the zero padding


def test_losses_by_hand():
    sources = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3).contiguous()
    fused = torch.full((1, 1, 3, 3), 0.25)
    w = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1).expand(1, 2, 3, 3)
    intensity_only = fusion_loss(sources, fused, w, w, c_int=1.0, c_grad=0.0)
    assert torch.isclose(intensity_only, torch.tensor((0.5 * 0.25) ** 2 + (0.5 * 0.75) ** 2))
    recon = torch.stack([torch.full((3, 3), 0.5), torch.full((3, 3), 0.9)])[None]
    assert torch.isclose(reconstruction_loss(sources, recon, c_grad=0.0), torch.tensor(0.25))


def test_symmetric_proposals_are_swapped_between_the_two_source_orders():
    _, _, lpn = tiny_networks()
    inner, _ = batches()
    inputs = exchange(inner)
    first, second = slice(0, 2), slice(2, 4)
    for w in lpn(inputs, exchanged=True):
        assert torch.allclose(w[second], w[first].flip(1), rtol=0, atol=1e-15)
    plain = lpn(inputs)[1]
    assert not torch.allclose(plain[second], plain[first].flip(1), atol=1e-3)  # not so by itself


def test_lpn_meta_gradient_with_symmetric_proposals_matches_finite_difference():
    fusion, recon, lpn = tiny_networks()
    inner, outer = batches()
    weights, alpha = LossWeights(fusion_grad=0.5, symmetric_proposals=True), 0.5
    _, grads = lpn_meta_gradient(fusion, recon, lpn, inner, outer, alpha, weights)
    _, plain_grads = lpn_meta_gradient(fusion, recon, lpn, inner, outer, alpha, LossWeights(fusion_grad=0.5))
    assert not all(torch.allclose(g, p) for g, p in zip(grads, plain_grads))
    assert_matches_finite_difference(fusion, recon, lpn, inner, outer, alpha, weights, grads)


@pytest.mark.parametrize("coefficients", [(1.0, 1.0), (0.5, 1.0), (1 / 3, 0.0)])
def test_lpn_meta_gradient_with_the_fusion_loss_matches_finite_difference(coefficients):
    """P's gradient weighs the meta term and the inner L_f as ``pair_coefficients`` says (the
    release's rule: 1/A and 0 or 1; --lpn_fusion_loss: 1 and 1)."""
    fusion, recon, lpn = tiny_networks()
    inner, outer = batches()
    weights, alpha = LossWeights(fusion_grad=0.5, symmetric_proposals=True), 0.5
    _, grads = lpn_meta_gradient(fusion, recon, lpn, inner, outer, alpha, weights, coefficients)
    _, meta_only = lpn_meta_gradient(fusion, recon, lpn, inner, outer, alpha, weights)
    assert not all(torch.allclose(g, m) for g, m in zip(grads, meta_only))
    assert_matches_finite_difference(fusion, recon, lpn, inner, outer, alpha, weights, grads, coefficients)


def test_pair_coefficients_of_both_rules():
    release, paper = LossWeights(), LossWeights(meta_rule="paper")
    assert [pair_coefficients(release, k, 2) for k in range(4)] == [(0.5, 0.0), (0.5, 1.0)] * 2
    assert [pair_coefficients(release, k, 3) for k in range(3)] == [(1 / 3, 0.0)] + [(1 / 3, 1.0)] * 2
    assert pair_coefficients(paper, 1, 2) == (1.0, 0.0)
    assert pair_coefficients(replace(paper, lpn_fusion_loss=True), 0, 2) == (1.0, 1.0)


def test_replicate_padding_invents_no_edge_at_the_border():
    """A constant image has no gradient anywhere; zero padding makes its border a step from 0
    (the release's loss), replicate padding does not, and inside the border both agree."""
    flat = torch.full((1, 1, 6, 7), 0.5)  # sums of multiples of 0.5 are exact
    assert torch.count_nonzero(gradient_map(flat, "replicate")) == 0
    zero = gradient_map(flat)
    assert zero[0, 0, 0, 3] == 0.5 * 4 and torch.count_nonzero(zero[..., 1:-1, 1:-1]) == 0
    image = torch.rand(2, 2, 9, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gradient_map(image)[..., 1:-1, 1:-1], gradient_map(image, "replicate")[..., 1:-1, 1:-1],
                          rtol=0, atol=1e-6)
    weights = LossWeights(gradient_padding="replicate")
    fusion, recon, lpn = tiny_networks()
    inner, outer = batches()
    _, grads = lpn_meta_gradient(fusion, recon, lpn, inner, outer, 0.5, weights)
    assert_matches_finite_difference(fusion, recon, lpn, inner, outer, 0.5, weights, grads)


def sobel_by_hand(image):
    """Zero-padded signed Sobel responses of a 2-D array, one pixel at a time: (x, y)."""
    height, width = image.shape
    padded = [[0.0] * (width + 2)] + [[0.0] + list(row) + [0.0] for row in image.tolist()] + [[0.0] * (width + 2)]
    x = [[0.0] * width for _ in range(height)]
    y = [[0.0] * width for _ in range(height)]
    for i in range(height):
        for j in range(width):
            up, row, down = padded[i], padded[i + 1], padded[i + 2]  # rows i-1, i, i+1; column j+1 is j
            x[i][j] = (up[j + 2] + 2 * row[j + 2] + down[j + 2]) - (up[j] + 2 * row[j] + down[j])
            y[i][j] = (down[j] + 2 * down[j + 1] + down[j + 2]) - (up[j] + 2 * up[j + 1] + up[j + 2])
    return torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)


def test_max_gradient_target_is_tdfusions_term_and_ignores_ps_gradient_weights():
    """``--gradient_target max``: per pixel and direction the source's Sobel response of larger
    magnitude, sign kept, is F's target; L1 averaged per direction, the two directions added (as
    TDFusion's loss reads); P's gradient weights change nothing."""
    g = torch.Generator().manual_seed(3)
    sources = torch.rand(2, 2, 5, 6, generator=g, dtype=torch.float64)
    fused = torch.rand(2, 1, 5, 6, generator=g, dtype=torch.float64)
    expected = 0.0
    for direction in (0, 1):
        errors = []
        for b in range(2):
            a_resp, b_resp = sobel_by_hand(sources[b, 0])[direction], sobel_by_hand(sources[b, 1])[direction]
            target = torch.where(a_resp.abs() >= b_resp.abs(), a_resp, b_resp)
            errors.append((sobel_by_hand(fused[b, 0])[direction] - target).abs())
        expected += torch.stack(errors).mean().item()
    w_int = torch.rand(2, 2, 5, 6, generator=g, dtype=torch.float64)
    gradient_only = [fusion_loss(sources, fused, w_int, w_grad, c_int=0.0, gradient_target="max")
                     for w_grad in (torch.rand(2, 2, 5, 6, generator=g, dtype=torch.float64), torch.zeros(2, 2, 5, 6))]
    assert gradient_only[0].item() == pytest.approx(expected, rel=1e-12)
    assert gradient_only[1].item() == gradient_only[0].item()
    weighted = fusion_loss(sources, fused, w_int, torch.full((2, 2, 5, 6), 0.5), c_int=0.0)
    assert abs(weighted.item() - expected) > 0.1 * expected  # the two terms are not the same


@pytest.mark.parametrize("coefficients", [(0.5, 0.0), (0.5, 1.0)])
def test_lpn_meta_gradient_with_the_max_gradient_target_matches_finite_difference(coefficients):
    fusion, recon, lpn = tiny_networks()
    inner, outer = batches()
    weights, alpha = LossWeights(fusion_grad=0.5, gradient_target="max"), 0.5
    _, grads = lpn_meta_gradient(fusion, recon, lpn, inner, outer, alpha, weights, coefficients)
    assert_matches_finite_difference(fusion, recon, lpn, inner, outer, alpha, weights, grads, coefficients)
    # P's last layer: its two gradient-weight channels get no gradient, its intensity channels do
    last = dict(zip(params(lpn), grads))["project_out_1.weight"]
    assert torch.count_nonzero(last[2:]) == 0 and torch.count_nonzero(last[:2]) > 0
