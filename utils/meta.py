"""One step of each of ReFusion's training stages, written with ``torch.func.functional_call``.

F (fusion), R (reconstruction) and P (loss proposal, LPN) are ordinary modules. A virtual step
is a dict of new tensors ``{name: theta - alpha * grad}`` that F or R is called with; nothing is
copied into shadow modules. Batches are ``(B,2,H,W)`` source pairs (A, B) in [0,1].
"""
from dataclasses import dataclass

import torch
from torch.func import functional_call

from utils.losses import fusion_loss, reconstruction_loss


@dataclass
class LossWeights:
    """Coefficients of both losses; ``fusion_grad`` is already scaled by (epoch+1)/epochs."""
    fusion_int: float = 1.0
    fusion_grad: float = 1.0
    recon_int: float = 1.0
    recon_grad: float = 1.0


def exchange(batch):
    """Input exchange: ``(B,2,H,W) -> (2B,2,H,W)``, the pairs as (A,B) then as (B,A)."""
    return torch.cat([batch, batch.flip(1)])


def reconstruction_targets(batch):
    """Targets for R on an exchanged batch: always (A,B), for both halves."""
    return torch.cat([batch, batch])


def params(module):
    return dict(module.named_parameters())


def virtual_step(parameters, loss, alpha, keep_graph):
    """``{name: p - alpha * dloss/dp}``; with ``keep_graph`` the result stays differentiable
    with respect to whatever ``loss`` depends on (second-order meta-gradient)."""
    grads = torch.autograd.grad(loss, list(parameters.values()), create_graph=keep_graph)
    return {name: p - alpha * g for (name, p), g in zip(parameters.items(), grads)}


def fusion_objective(fusion, lpn, fusion_params, lpn_params, batch, weights):
    """``L_f`` of F on the exchanged batch under P's weights. Returns (loss, fused)."""
    inputs = exchange(batch)
    w_int, w_grad = functional_call(lpn, lpn_params, (inputs,))
    fused = functional_call(fusion, fusion_params, (inputs,))
    loss = fusion_loss(inputs, fused, w_int, w_grad, weights.fusion_int, weights.fusion_grad)
    return loss, fused


def reconstruction_objective(recon, recon_params, fused, batch, weights):
    """``L_r`` of R reconstructing (A,B) from fused images of the exchanged batch."""
    reconstructed = functional_call(recon, recon_params, (fused,))
    return reconstruction_loss(reconstruction_targets(batch), reconstructed,
                               weights.recon_int, weights.recon_grad)


def meta_outer_loss(fusion, recon, lpn, lpn_params, inner_batch, outer_batch, alpha, weights):
    """Stage-1 objective as a function of P's parameters ``lpn_params``.

    Inner (``inner_batch``): a virtual SGD step of F under P's loss, kept in the graph so that
    ``theta_F'`` depends on ``lpn_params``, and a virtual step of R on ``L_r(R(F(x).detach()))``.
    Outer (``outer_batch``, new data): ``L_r(R'(F'(x)))``. Its gradient with respect to
    ``lpn_params`` is the (second-order) signal P learns from; P gets no gradient from the
    inner fusion loss itself.
    """
    fusion_params, recon_params = params(fusion), params(recon)
    inner_loss, fused = fusion_objective(fusion, lpn, fusion_params, lpn_params, inner_batch, weights)
    fusion_after = virtual_step(fusion_params, inner_loss, alpha, keep_graph=True)
    recon_loss = reconstruction_objective(recon, recon_params, fused.detach(), inner_batch, weights)
    recon_after = {k: v.detach() for k, v in virtual_step(recon_params, recon_loss, alpha, False).items()}
    fused_outer = functional_call(fusion, fusion_after, (exchange(outer_batch),))
    return reconstruction_objective(recon, recon_after, fused_outer, outer_batch, weights)


def lpn_meta_gradient(fusion, recon, lpn, inner_batch, outer_batch, alpha, weights):
    """(outer loss, gradients with respect to P's parameters, in ``lpn.parameters()`` order)."""
    lpn_params = params(lpn)
    loss = meta_outer_loss(fusion, recon, lpn, lpn_params, inner_batch, outer_batch, alpha, weights)
    return loss.detach(), torch.autograd.grad(loss, list(lpn_params.values()))


@torch.no_grad()
def apply_normalised_step(lpn, grads, lr):
    """``phi <- phi - lr * g / max|g|``, the max taken over all of P's gradients."""
    scale = max(g.abs().max() for g in grads).clamp_min(1e-12)
    for p, g in zip(lpn.parameters(), grads):
        p.sub_(lr * g / scale)


def fusion_step(fusion, recon, lpn, batch, weights, fusion_optimizer, recon_optimizer):
    """Stage 2: an optimiser step of F on ``L_f`` (P's weights fixed), then of R on
    ``L_r(R(F(x).detach()))``. Returns the two losses as floats."""
    with torch.no_grad():
        w_int, w_grad = lpn(exchange(batch))
    inputs = exchange(batch)
    fused = fusion(inputs)
    loss_f = fusion_loss(inputs, fused, w_int, w_grad, weights.fusion_int, weights.fusion_grad)
    fusion_optimizer.zero_grad(set_to_none=True)
    loss_f.backward()
    fusion_optimizer.step()
    loss_r = reconstruction_loss(reconstruction_targets(batch), recon(fused.detach()),
                                 weights.recon_int, weights.recon_grad)
    recon_optimizer.zero_grad(set_to_none=True)
    loss_r.backward()
    recon_optimizer.step()
    return loss_f.item(), loss_r.item()
