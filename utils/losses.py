"""ReFusion's losses: the LPN-weighted fusion loss and the reconstruction loss."""
import torch
import torch.nn.functional as F

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_SOBEL = torch.stack([_SOBEL_X, _SOBEL_X.t()])[:, None]  # (2,1,3,3): x then y


PADDINGS = ("zero", "replicate")


def sobel(images, padding="zero"):
    """Signed 3x3 Sobel responses per channel: ``(B,C,H,W) -> (B,C,2,H,W)``, x then y.

    ``zero`` padding (the release's) makes the image border a step from 0, a large gradient that
    is no edge of the scene; ``replicate`` padding invents none (docs/STUDIES.md: border stripes).
    """
    channels = images.shape[1]
    kernels = _SOBEL.to(images).repeat(channels, 1, 1, 1)  # (2C,1,3,3), x/y per channel
    if padding == "replicate":
        responses = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernels, groups=channels)
    else:
        responses = F.conv2d(images, kernels, padding=1, groups=channels)
    return responses.unflatten(1, (channels, 2))


def gradient_map(images, padding="zero"):
    """``|Sobel_x * I| + |Sobel_y * I|`` per channel: ``(B,C,H,W) -> (B,C,H,W)``."""
    return sobel(images, padding).abs().sum(dim=2)


def _weighted_squared_error(weights, sources, fused):
    """``sum over sources s of mean((w_s * (S_s - F))^2)``; weights/sources ``(B,2,H,W)``, fused ``(B,1,H,W)``."""
    return (weights * (sources - fused)).square().mean(dim=(0, 2, 3)).sum()


GRADIENT_TARGETS = ("weighted", "max")


def max_gradient_error(sources, fused, padding="zero"):
    """TDFusion's gradient term: ``mean|S_x F - S_x^max| + mean|S_y F - S_y^max|``, where per pixel
    and direction ``S^max`` is the source's signed response of larger magnitude. sources
    ``(B,2,H,W)``, fused ``(B,1,H,W)``; no weights: F is asked for the sharper source's edges.
    """
    responses = sobel(sources, padding)  # (B,2,2,H,W): source, direction
    first_larger = responses[:, 0].abs() >= responses[:, 1].abs()
    target = torch.where(first_larger, responses[:, 0], responses[:, 1])
    return (sobel(fused, padding)[:, 0] - target).abs().mean(dim=(0, 2, 3)).sum()


def fusion_loss(sources, fused, w_int, w_grad, c_int=1.0, c_grad=1.0, padding="zero",
                gradient_target="weighted"):
    """``c_int * [intensity term] + c_grad * [gradient term]`` with LPN's per-pixel weights.

    sources ``(B,2,H,W)``; fused ``(B,1,H,W)``; w_int, w_grad ``(B,2,H,W)``. Returns a scalar.
    ``c_grad`` is the epoch's coefficient: ``c_grad * (epoch+1) / epochs`` (the paper's ramp) or constant.
    ``gradient_target``: ``weighted`` (the paper: P weighs each source's gradient map, as its
    intensities) or ``max`` (``max_gradient_error``: TDFusion's term, w_grad unused).
    """
    intensity = _weighted_squared_error(w_int, sources, fused)
    if gradient_target == "max":
        gradient = max_gradient_error(sources, fused, padding)
    else:
        gradient = _weighted_squared_error(w_grad, gradient_map(sources, padding), gradient_map(fused, padding))
    return c_int * intensity + c_grad * gradient


def reconstruction_loss(sources, reconstructed, c_int=1.0, c_grad=1.0, padding="zero"):
    """``mean(max(|A-A^|, |B-B^|)^2)`` plus the same on gradient maps. Both ``(B,2,H,W)``."""
    intensity = (sources - reconstructed).abs().amax(dim=1).square().mean()
    gradient = (gradient_map(sources, padding) - gradient_map(reconstructed, padding)).abs().amax(dim=1).square().mean()
    return c_int * intensity + c_grad * gradient
