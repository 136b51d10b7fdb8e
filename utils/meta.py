"""One step of each of ReFusion's training stages, written with ``torch.func.functional_call``.

F (fusion), R (reconstruction) and P (loss proposal, LPN) are ordinary modules. A virtual step
is a dict of new tensors ``{name: theta - alpha * grad}`` that F or R is called with; nothing is
copied into shadow modules. P's second-order gradient uses a forward-mode product
(``torch.func.jvp``) of F instead of a double backward. Batches are ``(B,2,H,W)`` source pairs
(A, B) in [0,1].
"""
import warnings
from dataclasses import dataclass

import torch
from torch.func import functional_call

from utils.losses import fusion_loss, reconstruction_loss

# torch.func.jvp scripts a helper inside PyTorch itself; its deprecation notice is not ours to fix.
warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)


@dataclass
class LossWeights:
    """Coefficients of both losses (``fusion_grad`` already scaled by the epoch's ramp), whether
    P's proposals are made swap-equivariant (``LPN.forward(..., exchanged=True)``), P's update
    rule (``meta_rule``: ``META_RULES``), under the paper's rule whether P also descends every
    pair's inner fusion loss (``lpn_fusion_loss``), the padding of both losses' gradient maps
    (``utils.losses.PADDINGS``) and the fusion loss's gradient term (``GRADIENT_TARGETS``)."""
    fusion_int: float = 1.0
    fusion_grad: float = 1.0
    recon_int: float = 1.0
    recon_grad: float = 1.0
    symmetric_proposals: bool = False
    meta_rule: str = "release"
    lpn_fusion_loss: bool = False
    gradient_padding: str = "zero"
    gradient_target: str = "weighted"


META_RULES = ("release", "paper")


def pair_coefficients(weights, pair, accumulation_steps):
    """``(c_meta, c_f)``: P's gradient from the epoch's meta pair ``pair`` (0-based) is
    ``c_meta * dL_out/dphi + c_f * dL_f/dphi``, ``L_f`` the inner fusion loss at F's output.

    ``paper``: P learns from reconstruction alone, ``(1, 0)`` (``(1, 1)`` with ``lpn_fusion_loss``).
    ``release``: the release's code divides each outer loss by ``accumulation_steps``, and its
    inner ``backward(create_graph=True)`` with P's proposals attached leaves ``dL_f/dphi`` in P's
    ``.grad``, which it zeroes just before the first outer pass of each group: the first pair of a
    group keeps only its meta term, every later pair its ``L_f`` term too.
    """
    if weights.meta_rule == "paper":
        return 1.0, float(weights.lpn_fusion_loss)
    return 1.0 / accumulation_steps, float(pair % accumulation_steps != 0)


def exchange(batch):
    """Input exchange: ``(B,2,H,W) -> (2B,2,H,W)``, the pairs as (A,B) then as (B,A)."""
    return torch.cat([batch, batch.flip(1)])


def reconstruction_targets(batch):
    """Targets for R on an exchanged batch: always (A,B), for both halves."""
    return torch.cat([batch, batch])


def params(module):
    return dict(module.named_parameters())


def virtual_step(parameters, loss, alpha):
    """``{name: p - alpha * dloss/dp}`` as new tensors (no graph); the module is untouched."""
    grads = torch.autograd.grad(loss, list(parameters.values()))
    return {name: (p - alpha * g).detach() for (name, p), g in zip(parameters.items(), grads)}


def proposed_fusion_loss(inputs, fused, w_int, w_grad, weights):
    """``L_f`` of F's output on the exchanged batch under P's weights."""
    return fusion_loss(inputs, fused, w_int, w_grad, weights.fusion_int, weights.fusion_grad,
                       weights.gradient_padding, weights.gradient_target)


def reconstruction_objective(recon, recon_params, fused, batch, weights):
    """``L_r`` of R reconstructing (A,B) from fused images of the exchanged batch."""
    reconstructed = functional_call(recon, recon_params, (fused,))
    return reconstruction_loss(reconstruction_targets(batch), reconstructed,
                               weights.recon_int, weights.recon_grad, weights.gradient_padding)


def inner_steps(fusion, recon, lpn, lpn_params, batch, alpha, weights):
    """The inner half of a stage-1 pair: virtual steps of F (under P's loss) and of R.

    Returns ``(inputs, fused, w_int, w_grad, fusion_after, recon_after)``: the exchanged batch,
    F's output (no graph), P's weights (graph to ``lpn_params``) and the stepped parameters of F
    and R as plain tensors.
    """
    fusion_params = params(fusion)
    inputs = exchange(batch)
    w_int, w_grad = functional_call(lpn, lpn_params, (inputs, weights.symmetric_proposals))
    fused = functional_call(fusion, fusion_params, (inputs,))
    inner_loss = proposed_fusion_loss(inputs, fused, w_int.detach(), w_grad.detach(), weights)
    fusion_after = virtual_step(fusion_params, inner_loss, alpha)
    recon_params = params(recon)
    recon_loss = reconstruction_objective(recon, recon_params, fused.detach(), batch, weights)
    recon_after = virtual_step(recon_params, recon_loss, alpha)
    return inputs, fused.detach(), w_int, w_grad, fusion_after, recon_after


def outer_objective(fusion, recon, fusion_after, recon_after, batch, weights):
    """``L_r(R'(F'(x)))`` on the outer batch, targets (A,B)."""
    fused = functional_call(fusion, fusion_after, (exchange(batch),))
    return reconstruction_objective(recon, recon_after, fused, batch, weights)


def meta_outer_loss(fusion, recon, lpn, lpn_params, inner_batch, outer_batch, alpha, weights,
                    coefficients=(1.0, 0.0)):
    """The stage-1 objective as a function of P's parameters (value only).

    Inner batch: F steps ``theta_F' = theta_F - alpha * dL_f/dtheta_F`` under the loss that P
    proposes (so theta_F' depends on P), R steps on ``L_r(R(F(x).detach()))``. Outer batch (new
    data): ``c_meta * L_r(R'(F'(x))) + c_f * L_f`` with ``coefficients`` ``(c_meta, c_f)``
    (``pair_coefficients``). ``lpn_meta_gradient`` returns its exact gradient.
    """
    c_meta, c_f = coefficients
    inputs, fused, w_int, w_grad, fusion_after, recon_after = inner_steps(
        fusion, recon, lpn, lpn_params, inner_batch, alpha, weights)
    outer = c_meta * outer_objective(fusion, recon, fusion_after, recon_after, outer_batch, weights)
    if c_f:
        outer = outer + c_f * proposed_fusion_loss(inputs, fused, w_int, w_grad, weights)
    return outer


def lpn_meta_gradient(fusion, recon, lpn, inner_batch, outer_batch, alpha, weights,
                      coefficients=(1.0, 0.0)):
    """(outer loss ``L_r(R'(F'(x)))``, exact gradient of ``meta_outer_loss`` with respect to P's
    parameters).

    P only reaches the outer loss through ``theta_F'``. With ``v = dL_out/dtheta_F'`` and
    ``dL_f/dtheta_F = J^T g(w)`` (J: Jacobian of F's output, g: the loss's gradient with respect
    to that output, which is where P's weights w enter),
    ``dL_out/dphi = -alpha * d/dphi <J v, g(w(phi))>``. ``J v`` is one forward-mode product
    (``torch.func.jvp``), so the second-order term costs a forward pass of F instead of a
    double backward through it. ``coefficients`` ``(c_meta, c_f)`` weigh it against
    ``dL_f/dphi`` at F's current output (``pair_coefficients``: which pairs of the release's rule
    add that term).
    """
    c_meta, c_f = coefficients
    lpn_params = params(lpn)
    inputs, fused, w_int, w_grad, fusion_after, recon_after = inner_steps(
        fusion, recon, lpn, lpn_params, inner_batch, alpha, weights)
    fusion_after = {k: v.requires_grad_() for k, v in fusion_after.items()}
    outer = outer_objective(fusion, recon, fusion_after, recon_after, outer_batch, weights)
    direction = torch.autograd.grad(outer, list(fusion_after.values()))
    point = {k: v.detach() for k, v in params(fusion).items()}
    _, output_tangent = torch.func.jvp(lambda p: functional_call(fusion, p, (inputs,)),
                                       (point,), (dict(zip(point, direction)),))
    fused = fused.requires_grad_()
    inner_loss = proposed_fusion_loss(inputs, fused, w_int, w_grad, weights)
    loss_gradient = torch.autograd.grad(inner_loss, fused, create_graph=True)[0]
    objective = -alpha * c_meta * (loss_gradient * output_tangent).sum()
    if c_f:
        objective = objective + c_f * inner_loss
    return outer.detach(), torch.autograd.grad(objective, list(lpn_params.values()))


class LPNUpdate:
    """P's whole update rule: the gradients of ``accumulation_steps`` consecutive pairs (each
    weighed by ``pair_coefficients``) are summed, then ``phi <- phi - lr * g / max|g|`` with the max over all of P's gradients. A group
    cut short by the end of the epoch steps with what it has. ``pending`` (the partial sum, or
    None) is what a checkpoint must keep to resume mid-group."""

    def __init__(self, lpn, accumulation_steps):
        self.lpn, self.accumulation_steps, self.pending = lpn, accumulation_steps, None

    def add(self, grads, pair, pairs, lr):
        """Add the meta-gradient of the epoch's pair ``pair`` (0-based) of ``pairs``; steps P when
        that pair closes a group. Returns whether P stepped."""
        self.pending = grads if self.pending is None else [a + g for a, g in zip(self.pending, grads)]
        if (pair + 1) % self.accumulation_steps and pair + 1 != pairs:
            return False
        normalised_step(self.lpn, self.pending, lr)
        self.pending = None
        return True


@torch.no_grad()
def normalised_step(lpn, grads, lr):
    """``phi <- phi - lr * g / max|g|``, the max taken over all of P's gradients."""
    scale = max(g.abs().max() for g in grads).clamp_min(1e-12)
    for p, g in zip(lpn.parameters(), grads):
        p.sub_(lr * g / scale)


def fusion_step(fusion, recon, lpn, batch, weights, fusion_optimizer, recon_optimizer):
    """Stage 2: an optimiser step of F on ``L_f`` (P's weights fixed), then of R on
    ``L_r(R(F(x).detach()))``. Returns the two losses as floats."""
    inputs = exchange(batch)
    with torch.no_grad():
        w_int, w_grad = lpn(inputs, weights.symmetric_proposals)
    fused = fusion(inputs)
    loss_f = proposed_fusion_loss(inputs, fused, w_int, w_grad, weights)
    fusion_optimizer.zero_grad(set_to_none=True)
    loss_f.backward()
    fusion_optimizer.step()
    loss_r = reconstruction_loss(reconstruction_targets(batch), recon(fused.detach()),
                                 weights.recon_int, weights.recon_grad, weights.gradient_padding)
    recon_optimizer.zero_grad(set_to_none=True)
    loss_r.backward()
    recon_optimizer.step()
    return loss_f.item(), loss_r.item()
