"""Regenerate the bundled test cases from pictures shipped inside scikit-image.

    python test_cases/make_test_cases.py

Deterministic (fixed seeds). Writes test_cases/<TASK>/<source folder>/<stem>.png for
IVIF (infrared|visible), MIF (CT_PET_SPECT|MRI), MFIF (near|far) and MEIF (under|over).
Recipes and licences: test_cases/README.md.
"""
import os
import sys

import cv2
import numpy as np
from skimage import data, transform

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from utils.image import write_png  # noqa: E402


def to_linear(rgb_uint8):
    """sRGB-ish uint8 -> linear radiance in [0,1] (gamma 2.2)."""
    return (rgb_uint8.astype(np.float64) / 255) ** 2.2


def camera_response(radiance):
    """A camera: radiance -> clipped at the sensor's full well -> gamma 1/2.2 -> uint8."""
    return np.round(255 * np.clip(radiance, 0, 1) ** (1 / 2.2)).astype(np.uint8)


def fit(image, longest=400):
    scale = longest / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def luminance(rgb):
    return rgb @ np.array([0.2126, 0.7152, 0.0722]) if rgb.ndim == 3 else rgb


# -- infrared-visible ------------------------------------------------------------------------
def infrared_visible(rgb, hot_spots, rng):
    """Thermal: sunlit surfaces warm with their absorptance (1 - albedo), people/engines are hot
    spots; radiance ~ emissivity * T^4 (Stefan-Boltzmann), blurred by the coarser IR optics, with
    sensor noise. Visible: the same scene at 8% illumination with photon (Poisson) noise."""
    linear = to_linear(rgb)
    albedo = cv2.GaussianBlur(luminance(linear), (0, 0), 3)
    height, width = albedo.shape
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    temperature = 285 + 18 * (1 - albedo)
    for row, col, radius, heat in hot_spots:
        temperature += heat * np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * radius ** 2))
    saturation = (linear.max(axis=2) - linear.min(axis=2)) if linear.ndim == 3 else 0 * albedo
    emissivity = 0.92 + 0.06 * (1 - saturation)
    radiance = emissivity * temperature ** 4
    radiance = (radiance - radiance.min()) / (radiance.max() - radiance.min())
    radiance = cv2.GaussianBlur(radiance, (0, 0), 1.5) + rng.normal(0, 0.01, radiance.shape)
    infrared = np.round(255 * np.clip(radiance, 0, 1)).astype(np.uint8)
    photons = 600.0
    grey = linear.ndim == 3 and np.array_equal(linear[..., 0], linear[..., 2])
    dim = rng.poisson((linear[..., :1] if grey else linear) * 0.08 * photons) / photons
    return infrared, camera_response(np.repeat(dim, 3, axis=2) if grey else dim)


# -- medical ---------------------------------------------------------------------------------
def mri_pet(anatomy, rng, blobs=5):
    """MRI: the anatomical slice with mild Rician noise. PET: smooth tracer uptake (Gaussian
    blobs of activity inside the tissue), blurred to PET resolution and colour-mapped."""
    tissue = anatomy > 0.05
    noise = rng.normal(0, 0.02, (2,) + anatomy.shape)
    mri = np.sqrt((anatomy + noise[0]) ** 2 + noise[1] ** 2)
    height, width = anatomy.shape
    yy, xx = np.mgrid[0:height, 0:width]
    inside = np.argwhere(cv2.erode(tissue.astype(np.uint8), np.ones((25, 25), np.uint8)) > 0)
    activity = 0.15 * tissue.astype(np.float64)
    for row, col in inside[rng.choice(len(inside), blobs, replace=False)]:
        activity += rng.uniform(0.5, 1.0) * np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * rng.uniform(8, 20) ** 2))
    activity = cv2.GaussianBlur(activity * tissue, (0, 0), 4)
    pet = cv2.applyColorMap(np.round(255 * activity / activity.max()).astype(np.uint8), cv2.COLORMAP_HOT)
    pet[cv2.GaussianBlur(tissue.astype(np.float64), (0, 0), 4) < 0.05] = 0
    return cv2.cvtColor(pet, cv2.COLOR_BGR2RGB), np.round(255 * np.clip(mri, 0, 1)).astype(np.uint8)


# -- multi-focus -----------------------------------------------------------------------------
def defocus(rgb, depth, focus_depth, strength, levels=8):
    """Thin-lens defocus: the blur radius grows with |1/depth - 1/focus|; the image is blurred at
    a few radii and each pixel takes the blend of the two nearest radii."""
    radius = strength * np.abs(1 / depth - 1 / focus_depth)
    steps = np.linspace(0, radius.max(), levels)
    stack = [rgb.astype(np.float64) if s == 0 else cv2.GaussianBlur(rgb.astype(np.float64), (0, 0), s)
             for s in steps]
    position = np.clip(radius / (steps[1] - steps[0]), 0, levels - 1 - 1e-9)
    lower = np.floor(position).astype(int)
    weight = (position - lower)[..., None]
    out = np.zeros_like(stack[0])
    for level in range(levels - 1):
        mask = (lower == level)[..., None]
        out += mask * ((1 - weight) * stack[level] + weight * stack[level + 1])
    return np.round(np.clip(out, 0, 255)).astype(np.uint8)


def near_far(rgb, depth, strength):
    near, far = np.percentile(depth, 5), np.percentile(depth, 95)
    return defocus(rgb, depth, near, strength), defocus(rgb, depth, far, strength)


# -- multi-exposure --------------------------------------------------------------------------
def under_over(rgb, rng, stops=2.0):
    """Scene radiance (linearised, dynamic range stretched) through a camera response with
    clipping at exposures 2^-stops and 2^+stops; the dark frame carries read noise."""
    radiance = to_linear(rgb) ** 1.6 * 2.0
    under = camera_response(radiance * 2 ** -stops + rng.normal(0, 0.002, radiance.shape))
    over = camera_response(radiance * 2 ** stops)
    return under, over


def main():
    rng = np.random.default_rng(2024)
    cases = {}
    cases[("IVIF", "astronaut")] = infrared_visible(fit(data.astronaut(), 384),
                                                    [(0.28, 0.47, 0.08, 25), (0.75, 0.45, 0.18, 10)], rng)
    camera = np.repeat(fit(data.camera(), 384)[..., None], 3, axis=2)
    cases[("IVIF", "camera")] = infrared_visible(camera, [(0.25, 0.45, 0.07, 25), (0.55, 0.4, 0.15, 12)], rng)

    phantom = data.shepp_logan_phantom()
    cases[("MIF", "phantom")] = mri_pet(phantom, rng)
    turned = transform.rotate(transform.rescale(phantom, 0.8), 20, resize=False)
    cases[("MIF", "phantom_turned")] = mri_pet(np.pad(turned, 40), rng)

    left, _, disparity = data.stereo_motorcycle()
    disparity = np.where(np.isfinite(disparity) & (disparity > 0), disparity, np.nan)
    disparity = np.where(np.isnan(disparity), np.nanmin(disparity), disparity)
    motorcycle, disparity = fit(left), fit(disparity.astype(np.float32))
    cases[("MFIF", "motorcycle")] = near_far(motorcycle, 1000 / disparity, strength=80)
    cat = data.chelsea()
    height, width = cat.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    subject = cv2.GaussianBlur((((yy - 0.55 * height) / (0.45 * height)) ** 2 +
                                ((xx - 0.45 * width) / (0.3 * width)) ** 2 < 1).astype(np.float64), (0, 0), 8)
    cases[("MFIF", "chelsea")] = near_far(cat, 1.0 + 4.0 * (1 - subject) + yy / height, strength=12)

    cases[("MEIF", "coffee")] = under_over(fit(data.coffee()), rng)
    cases[("MEIF", "rocket")] = under_over(fit(data.rocket()), rng)

    folders = {"IVIF": ("infrared", "visible"), "MIF": ("CT_PET_SPECT", "MRI"),
               "MFIF": ("near", "far"), "MEIF": ("under", "over")}
    for (task, stem), images in cases.items():
        for folder, image in zip(folders[task], images):
            write_png(os.path.join(HERE, task, folder, f"{stem}.png"), image)
    print(f"wrote {2 * len(cases)} images under {HERE}")


if __name__ == "__main__":
    main()
