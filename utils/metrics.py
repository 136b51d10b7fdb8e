"""Image-fusion quality metrics, on grey images as float64 arrays in [0,255].

Each metric takes the two sources ``a``, ``b`` and the fused image ``f`` (same shape) unless it
is a no-reference statistic of ``f`` alone. Conventions follow the metrics reported by this line
of work (EN, SD, SF, AG, MI, SCD, VIF, Qabf, SSIM, CC, PSNR, MSE).
"""
import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

from utils.errors import UserError

EPS = 1e-10
MIN_SIDE = 7  # SSIM's 7x7 window; SF and AG also need two pixels along each axis


def entropy(f):
    """EN: Shannon entropy (bits) of the histogram of the rounded image."""
    counts = np.bincount(np.clip(np.round(f), 0, 255).astype(np.int64).ravel(), minlength=256)
    p = counts[counts > 0] / f.size
    return float(-(p * np.log2(p)).sum())


def standard_deviation(f):
    """SD: population standard deviation."""
    return float(np.std(f))


def spatial_frequency(f):
    """SF: sqrt(mean of squared horizontal differences + mean of squared vertical differences)."""
    rows = np.diff(f, axis=1)
    cols = np.diff(f, axis=0)
    return float(np.sqrt((rows ** 2).mean() + (cols ** 2).mean()))


def average_gradient(f):
    """AG: mean of sqrt((Gx^2 + Gy^2) / 2), central differences inside, one-sided at borders."""
    gy, gx = np.gradient(f)
    return float(np.sqrt((gx ** 2 + gy ** 2) / 2).mean())


def _mutual_information(x, y):
    """MI (natural log) from the joint histogram of integer grey values."""
    xi = np.clip(np.round(x), 0, 255).astype(np.int64).ravel()
    yi = np.clip(np.round(y), 0, 255).astype(np.int64).ravel()
    joint = np.bincount(xi * 256 + yi, minlength=256 * 256).reshape(256, 256) / xi.size
    px, py = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / np.outer(px, py)[nz])).sum())


def mutual_information(a, b, f):
    """MI: MI(A,F) + MI(B,F)."""
    return _mutual_information(a, f) + _mutual_information(b, f)


def _correlation(x, y):
    x = x - x.mean()
    y = y - y.mean()
    return float((x * y).sum() / (np.sqrt((x ** 2).sum() * (y ** 2).sum()) + EPS))


def scd(a, b, f):
    """SCD: corr(F - B, A) + corr(F - A, B) (sum of the correlations of differences)."""
    return _correlation(f - b, a) + _correlation(f - a, b)


def correlation_coefficient(a, b, f):
    """CC: mean of corr(A,F) and corr(B,F)."""
    return (_correlation(a, f) + _correlation(b, f)) / 2


def mse(a, b, f):
    """MSE: mean of the mean squared errors of F against A and against B."""
    return float((((a - f) ** 2).mean() + ((b - f) ** 2).mean()) / 2)


def psnr(a, b, f):
    """PSNR (dB) of F from the MSE above, peak 255."""
    return float(10 * np.log10(255.0 ** 2 / max(mse(a, b, f), EPS)))


def ssim(a, b, f):
    """SSIM: SSIM(A,F) + SSIM(B,F), scikit-image defaults, data_range 255."""
    return float(structural_similarity(a, f, data_range=255) + structural_similarity(b, f, data_range=255))


def _gaussian_valid(image, size):
    """'valid' correlation with a normalised size x size Gaussian of sd size/5 (separable)."""
    half = (size - 1) / 2
    taps = np.exp(-((np.arange(size) - half) ** 2) / (2 * (size / 5) ** 2))
    taps /= taps.sum()
    smoothed = ndimage.correlate1d(ndimage.correlate1d(image, taps, axis=0, mode="constant"),
                                   taps, axis=1, mode="constant")
    r = size // 2
    return smoothed[r:image.shape[0] - r, r:image.shape[1] - r]


def _vif(reference, distorted, sigma_n_sq=2.0):
    """Multi-scale pixel-domain VIF of ``distorted`` against ``reference`` (4 scales)."""
    numerator = denominator = 0.0
    ref, dist = reference, distorted
    for scale in range(1, 5):
        size = 2 ** (5 - scale) + 1
        if scale > 1:
            ref = _gaussian_valid(ref, size)[::2, ::2]
            dist = _gaussian_valid(dist, size)[::2, ::2]
        if min(ref.shape) < size:
            break
        mu1, mu2 = _gaussian_valid(ref, size), _gaussian_valid(dist, size)
        sigma1_sq = _gaussian_valid(ref * ref, size) - mu1 * mu1
        sigma2_sq = _gaussian_valid(dist * dist, size) - mu2 * mu2
        sigma12 = _gaussian_valid(ref * dist, size) - mu1 * mu2
        sigma1_sq = np.maximum(sigma1_sq, 0)
        sigma2_sq = np.maximum(sigma2_sq, 0)
        g = sigma12 / (sigma1_sq + EPS)
        sv_sq = sigma2_sq - g * sigma12
        flat_ref = sigma1_sq < EPS
        g[flat_ref] = 0
        sv_sq[flat_ref] = sigma2_sq[flat_ref]
        sigma1_sq[flat_ref] = 0
        flat_dist = sigma2_sq < EPS
        g[flat_dist] = 0
        sv_sq[flat_dist] = 0
        negative = g < 0
        sv_sq[negative] = sigma2_sq[negative]
        g[negative] = 0
        sv_sq = np.maximum(sv_sq, EPS)
        numerator += np.log10(1 + g * g * sigma1_sq / (sv_sq + sigma_n_sq)).sum()
        denominator += np.log10(1 + sigma1_sq / sigma_n_sq).sum()
    return float(numerator / denominator) if denominator > 0 else 0.0


def vif(a, b, f):
    """VIF: VIF(A,F) + VIF(B,F), multi-scale pixel-domain, sigma_n^2 = 2."""
    return _vif(a, f) + _vif(b, f)


_SOBEL_ROWS = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)
_SOBEL_COLS = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)


def _edges(image):
    """Sobel edge strength and orientation (zero padding, 'same' size)."""
    gy = ndimage.correlate(image, _SOBEL_ROWS, mode="constant")
    gx = ndimage.correlate(image, _SOBEL_COLS, mode="constant")
    strength = np.sqrt(gx ** 2 + gy ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.where(gx == 0, np.pi / 2, np.arctan(gy / np.where(gx == 0, 1, gx)))
    return strength, angle


def _edge_preservation(g_source, a_source, g_fused, a_fused):
    """Q^{SF}: how well the fused image keeps the source's edge strength and orientation."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(g_source > g_fused, g_fused / g_source,
                         np.where(g_source == g_fused, 1.0, g_source / g_fused))
    alignment = 1 - np.abs(a_source - a_fused) / (np.pi / 2)
    q_strength = 0.9994 / (1 + np.exp(-15 * (ratio - 0.5)))
    q_angle = 0.9879 / (1 + np.exp(-22 * (alignment - 0.8)))
    return q_strength * q_angle


def qabf(a, b, f):
    """Qabf (Xydeas-Petrovic): edge preservation weighted by the sources' edge strengths.

    Where a source and the fused image have equal edge strength the strength ratio is 1 (the
    paper's definition; some implementations substitute the strength itself there).
    """
    ga, aa = _edges(a)
    gb, ab = _edges(b)
    gf, af = _edges(f)
    weight = ga + gb
    total = weight.sum()
    if total == 0:
        return 0.0
    q = _edge_preservation(ga, aa, gf, af) * ga + _edge_preservation(gb, ab, gf, af) * gb
    return float(q.sum() / total)


METRICS = {"EN": lambda a, b, f: entropy(f), "SD": lambda a, b, f: standard_deviation(f),
           "SF": lambda a, b, f: spatial_frequency(f), "AG": lambda a, b, f: average_gradient(f),
           "MI": mutual_information, "SCD": scd, "VIF": vif, "Qabf": qabf, "SSIM": ssim,
           "CC": correlation_coefficient, "PSNR": psnr, "MSE": mse}


def evaluate(a, b, f):
    """All metrics for one triple: ``{name: value}``."""
    a, b, f = (np.asarray(x, dtype=np.float64) for x in (a, b, f))
    if not a.shape == b.shape == f.shape:
        raise UserError(f"shapes differ: {a.shape}, {b.shape}, {f.shape}")
    if min(f.shape) < MIN_SIDE:
        raise UserError(f"{f.shape[1]}x{f.shape[0]} pixels is too small to score: the metrics need "
                        f"at least {MIN_SIDE}x{MIN_SIDE} (SSIM's window)")
    return {name: metric(a, b, f) for name, metric in METRICS.items()}
