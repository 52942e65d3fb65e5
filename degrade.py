"""
Real-ESRGAN second-order degradation: batched, seeded, pure torch, CPU or GPU.

Wang et al., "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic Data",
arXiv 2107.10833, Sec. 3. StrSR, FluxSR, SMFSR and TEASR all make their training LR images this
way, and the DIV2K-val test inputs are made the same way. With k1, k2 random blur kernels and s the
final sinc filter (numbers: the official train_realesrgan_x4plus.yml):

  gt = USM(hr)                                    sharpened target (optional)
  stage 1:  x = JPEG(noise(resize(gt * k1)))
  stage 2:  x = noise(resize(x * k2))             the k2 blur with p 0.8
            x = JPEG(resize_lr(x) * s)  or  resize_lr(JPEG(x)) * s,  50/50
  lr = round(clamp(x, 0, 1) * 255) / 255          LR size (H // scale, W // scale), as the reference

PRESETS["bicubic"] is the classical non-blind setting instead: lr = round(bicubic_down(hr) * 255) / 255
(antialiased, as PIL's resize), gt = hr. The `--model mini` runs train and score on it (ours: a
few hundred CPU steps learn little beyond bicubic on the blind mix, see the README).

Where the reference (basicsr RealESRGANDataset + RealESRGANModel.feed_data) draws per image, so do
we: the three kernels, noise sigma or Poisson scale, gray or colour noise, JPEG quality. Per batch:
up/down/keep and its factor, resize mode, Gaussian or Poisson, whether the second blur runs, the
order of the last stage. Every draw comes from `generator`, so a seed fixes the LR batch.

  lr, gt = degrade(hr, scale=4, opts=PRESETS["seesr"], generator=g)   # hr (B, 3, H, W) in [0, 1]
  python degrade.py --hr DIV2K_valid_HR --out DIV2K_valid_LR --seed 0  # paired LR PNGs
  python degrade.py --bench                                            # images/s table

Differences from the reference, each on purpose:
  - The 51x51 USM blur runs separably as two matmuls (same numbers, ~3x faster on CPU).
  - JPEG rounding is straight-through: the forward pass rounds exactly, as the DiffJPEG(
    differentiable=False) used in Real-ESRGAN training; the gradient passes as identity.
  - JPEG floors quantisation steps at 1 as libjpeg does (changes only q > 95; q = 100 would divide by zero).
    Otherwise it equals basicsr's DiffJPEG, zero padding to whole 16x16 blocks included (libjpeg replicates the
    edge instead; the zeros ring at the bottom and right borders, which is the LR distribution the papers trained on).
  - Gray Gaussian noise is drawn per image (basicsr draws one (H, W) field shared by the batch).
"""

import argparse
import math
import os
import time
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# -----------------------------------------------------------------------------
# options

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
KERNEL_PROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
RESIZE_MODES = ("area", "bilinear", "bicubic")

@dataclass(frozen=True)
class DegradeOpts:
    # sharpening of the target: USMSharp defaults (weight 0.5, threshold 10/255)
    use_usm: bool = True
    usm_weight: float = 0.5
    usm_threshold: float = 10.0  # in 8-bit units
    # blur kernels, sizes odd 7..21 zero-padded to 21 (realesrgan_dataset.py + x4plus config)
    kernel_list: tuple = KERNEL_TYPES
    kernel_prob: tuple = KERNEL_PROB
    sinc_prob: float = 0.1
    blur_sigma: tuple = (0.2, 3.0)
    betag_range: tuple = (0.5, 4.0)
    betap_range: tuple = (1.0, 2.0)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple = (0.2, 1.5)
    betag_range2: tuple = (0.5, 4.0)
    betap_range2: tuple = (1.0, 2.0)
    final_sinc_prob: float = 0.8
    # stage 1 (x4plus config)
    resize_prob: tuple = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple = (1.0, 30.0)  # sigma, 8-bit units
    poisson_scale_range: tuple = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple = (30.0, 95.0)
    # stage 2 (x4plus config)
    second_blur_prob: float = 0.8
    resize_prob2: tuple = (0.3, 0.4, 0.3)
    resize_range2: tuple = (0.3, 1.2)  # relative to the final LR size
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple = (1.0, 25.0)
    poisson_scale_range2: tuple = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple = (30.0, 95.0)
    # the classical setting: bicubic downsampling only, none of the above
    bicubic_only: bool = False

PRESETS = {
    "realesrgan": DegradeOpts(),
    # SeeSR's milder online ranges (its params_realesrgan.yml); kernels as Real-ESRGAN
    "seesr": DegradeOpts(resize_range=(0.3, 1.5), noise_range=(1.0, 15.0), poisson_scale_range=(0.05, 2.0),
                         jpeg_range=(60.0, 95.0), second_blur_prob=0.5, resize_range2=(0.6, 1.2),
                         noise_range2=(1.0, 12.0), poisson_scale_range2=(0.05, 1.0), jpeg_range2=(60.0, 100.0)),
    "bicubic": DegradeOpts(use_usm=False, bicubic_only=True),  # classical x4 (the mini runs, ours)
}

def check_preset(name):
    """A --degrade value: one of PRESETS, or a clear error."""
    if name not in PRESETS:
        raise SystemExit(f"--degrade {name!r}: choose from {', '.join(PRESETS)}")

# -----------------------------------------------------------------------------
# random draws: all from the generator, on the generator's device

def _gdev(generator, ref):
    return generator.device if generator is not None else ref.device

def _rand(n, generator, device, lo=0.0, hi=1.0):
    return torch.rand(n, generator=generator, device=device) * (hi - lo) + lo

def _choice(probs, n, generator, device):
    """n indices drawn from the categorical distribution probs."""
    cdf = torch.tensor(probs, device=device).cumsum(0)
    u = torch.rand(n, generator=generator, device=device) * cdf[-1]
    return (u[:, None] >= cdf).sum(1).clamp_max(len(probs) - 1)

def _per_image(v, B, ref):
    """A number or a (B,) tensor -> a float (B, 1, 1, 1) tensor on ref's device."""
    return torch.as_tensor(v, device=ref.device).float().reshape(-1).expand(B).reshape(B, 1, 1, 1)

# -----------------------------------------------------------------------------
# blur kernels

def _support(k, half):
    """Zero k (n, K, K) outside each centred (2 half + 1)^2 window, i.e. the reference's zero padding
    of a size-(2 half + 1) kernel to K, then normalise to sum 1."""
    K = k.shape[-1]
    a = (torch.arange(K, device=k.device) - K // 2).abs()
    k = k * (torch.maximum(a[:, None], a[None, :]) <= half.view(-1, 1, 1))
    return k / k.sum((-2, -1), keepdim=True)

def sinc_kernel(cutoff, size, pad_to=None):
    """Circular low-pass (2-D sinc) kernels: cutoff J1(cutoff r) / (2 pi r), centre cutoff^2 / (4 pi),
    normalised (basicsr circular_lowpass_kernel). cutoff in radians (pi = Nyquist), size odd; either may
    be a (n,) tensor. Returns (n, K, K), zero outside each size, K = pad_to or the largest size."""
    cutoff = torch.as_tensor(cutoff, dtype=torch.float64).reshape(-1, 1, 1)
    size = torch.as_tensor(size, device=cutoff.device).reshape(-1)
    K = pad_to or int(size.max())
    a = torch.arange(K, device=cutoff.device, dtype=torch.float64) - K // 2
    r = (a[:, None] ** 2 + a[None, :] ** 2).sqrt()
    k = cutoff * torch.special.bessel_j1(cutoff * r) / (2 * math.pi * r.clamp_min(1e-9))
    k = torch.where(r == 0, cutoff ** 2 / (4 * math.pi), k)  # the limit at r = 0
    n = max(len(cutoff), len(size))
    return _support(k.expand(n, K, K), (size // 2).expand(n)).float()

def random_kernel(n, kernel_list=KERNEL_TYPES, kernel_prob=KERNEL_PROB, sigma_range=(0.2, 3.0),
                  betag_range=(0.5, 4.0), betap_range=(1.0, 2.0), sinc_prob=0.1, sizes=(7, 21), pad_to=21,
                  generator=None, device="cpu"):
    """n random blur kernels (n, pad_to, pad_to), each summing to 1, as RealESRGANDataset draws them:
    odd size in sizes; with p sinc_prob a sinc (cutoff U[pi/3, pi] below size 13, else U[pi/5, pi]);
    else a type from kernel_list: (generalized) Gaussian exp(-0.5 q^beta) or plateau 1 / (q^beta + 1),
    q = p^T Sigma^-1 p, Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T; iso: sy = sx, theta = 0."""
    dev = generator.device if generator is not None else torch.device(device)
    u = lambda lo, hi: _rand(n, generator, dev, lo, hi)
    half = torch.randint(sizes[0] // 2, sizes[1] // 2 + 1, (n,), generator=generator, device=dev)
    kind = _choice(kernel_prob, n, generator, dev)
    aniso = torch.tensor([t.endswith("aniso") for t in kernel_list], device=dev)[kind]
    family = torch.tensor([2 * t.startswith("plateau") + t.startswith("generalized") for t in kernel_list],
                          device=dev)[kind]  # 0 Gaussian, 1 generalized, 2 plateau
    sx = u(*sigma_range)
    sy = torch.where(aniso, u(*sigma_range), sx)
    theta = torch.where(aniso, u(-math.pi, math.pi), 0.0)
    # beta is U[lo, 1] or U[1, hi] with p 0.5 each (basicsr random_bivariate_generalized_Gaussian/_plateau)
    lo = torch.where(family == 2, betap_range[0], betag_range[0])
    hi = torch.where(family == 2, betap_range[1], betag_range[1])
    r = u(0, 1)
    beta = torch.where(u(0, 1) < 0.5, lo + (1 - lo) * r, 1 + (hi - 1) * r)
    beta = torch.where(family == 0, 1.0, beta).view(n, 1, 1)
    a = torch.arange(pad_to, device=dev, dtype=torch.float32) - pad_to // 2
    y, x = torch.meshgrid(a, a, indexing="ij")  # p = (x, y) = (column, row), as basicsr mesh_grid
    c, s = theta.cos().view(n, 1, 1), theta.sin().view(n, 1, 1)
    q = ((c * x + s * y) / sx.view(n, 1, 1)) ** 2 + ((c * y - s * x) / sy.view(n, 1, 1)) ** 2
    k = torch.where((family == 2).view(n, 1, 1), 1 / (q ** beta + 1), torch.exp(-0.5 * q ** beta))
    sinc = (u(0, 1) < sinc_prob).view(n, 1, 1)
    cutoff = torch.where(half < 6, u(math.pi / 3, math.pi), u(math.pi / 5, math.pi))
    k = torch.where(sinc, sinc_kernel(cutoff, 2 * half + 1, pad_to).to(k), k)
    return _support(k, half)

# -----------------------------------------------------------------------------
# filtering and sharpening

def filter2d(img, kernels):
    """Filter each image of img (B, C, H, W) with its own kernel (B, k, k) (or one (k, k) for all), k odd,
    reflect padding, same size out (basicsr filter2D). Images smaller than k // 2 + 1 are padded by
    replication, where reflection is undefined."""
    B, C, H, W = img.shape
    k = kernels.shape[-1]
    p = k // 2
    # correlation, as the reference; every kernel here is point-symmetric, so it is also convolution
    w = kernels.to(img).expand(B, k, k).repeat_interleave(C, 0).unsqueeze(1)  # (B*C, 1, k, k)
    x = F.pad(img, (p, p, p, p), mode="reflect" if p < min(H, W) else "replicate")
    return F.conv2d(x.reshape(1, B * C, H + 2 * p, W + 2 * p), w, groups=B * C).view(B, C, H, W)

def _reflect_blur_matrix(n, g):
    """(n, n) matrix M such that M @ x filters x along its first axis with the 1-D kernel g under
    reflect padding (the same numbers as F.pad(mode="reflect") then a valid convolution)."""
    r = g.numel() // 2
    idx = (torch.arange(n, device=g.device)[:, None] + torch.arange(-r, r + 1, device=g.device)).abs()
    idx = torch.where(idx > n - 1, 2 * (n - 1) - idx, idx).clamp(0, n - 1)  # clamp: tiny images only
    return torch.zeros(n, n, device=g.device, dtype=g.dtype).scatter_add_(1, idx, g.expand(n, -1).contiguous())

def usm_sharp(img, weight=0.5, threshold=10.0, size=51, sigma=8.0):
    """Unsharp masking as Real-ESRGAN's USMSharp: sharp = clamp(img + weight (img - blur)), returned
    through a soft mask, the blurred indicator of |img - blur| > threshold / 255. size 51 is USMSharp's
    radius 50 made odd; sigma 8 is what cv2.getGaussianKernel(51, 0) uses: 0.3 ((51 - 1) / 2 - 1) + 0.8."""
    H, W = img.shape[-2:]
    g = torch.exp(-(torch.arange(size, device=img.device, dtype=img.dtype) - size // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    # The reference convolves with the full 51x51 kernel (2601 MACs/pixel). The Gaussian is separable,
    # and two dense matmuls with banded reflect matrices beat depthwise conv1d on CPU (0.29 s vs 0.77 s
    # for 16x3x512x512 on 2 cores) despite the zeros they multiply.
    Mh, Mw = _reflect_blur_matrix(H, g), _reflect_blur_matrix(W, g)
    blur = lambda x: Mh @ x @ Mw.T
    residual = img - blur(img)
    soft_mask = blur((residual.abs() * 255 > threshold).to(img.dtype))
    sharp = (img + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img

# -----------------------------------------------------------------------------
# noise

LUMA = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale, used by the reference's gray Poisson noise

def add_gaussian_noise(img, sigma, gray=False, generator=None):
    """clamp(img + N(0, (sigma / 255)^2)); sigma (8-bit units) and gray are numbers or (B,) tensors.
    A gray image gets one noise field for its three channels."""
    B, _, H, W = img.shape
    dev = _gdev(generator, img)
    noise = torch.randn(img.shape, generator=generator, device=dev).to(img)
    gray = _per_image(gray, B, img) > 0
    if gray.any():
        noise = torch.where(gray, torch.randn((B, 1, H, W), generator=generator, device=dev).to(img), noise)
    return (img + noise * _per_image(sigma, B, img) / 255).clamp(0, 1)

def _poisson_levels(x):
    """Per image (B, 1, 1, 1): 2^ceil(log2(number of distinct 8-bit values)); x is already on the grid."""
    B = x.shape[0]
    q = (x * 255).round().long().reshape(B, -1) + 256 * torch.arange(B, device=x.device)[:, None]
    n_unique = (torch.bincount(q.reshape(-1), minlength=256 * B).view(B, 256) > 0).sum(1)
    return (2.0 ** torch.log2(n_unique.double()).ceil()).float().view(B, 1, 1, 1)

def add_poisson_noise(img, scale, gray=False, generator=None):
    """Shot noise as basicsr generate_poisson_noise_pt: x = img on the 8-bit grid, L = _poisson_levels(x),
    noise = Poisson(x L) / L - x, out = clamp(img + scale noise). A gray image uses the noise of its luma
    for all three channels. scale and gray are numbers or (B,) tensors."""
    B = img.shape[0]
    dev = _gdev(generator, img)

    def shot(x):
        x = (x * 255).round().clamp(0, 255) / 255
        L = _poisson_levels(x)
        return torch.poisson((x * L).to(dev), generator=generator).to(img) / L - x

    noise = shot(img)
    gray = _per_image(gray, B, img) > 0
    if gray.any():
        luma = (img * img.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        noise = torch.where(gray, shot(luma).expand_as(img), noise)
    return (img + noise * _per_image(scale, B, img)).clamp(0, 1)

# -----------------------------------------------------------------------------
# JPEG

# ITU-T T.81 Annex K quantisation tables as printed (row = vertical frequency)
Y_TABLE = [[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
           [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
           [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]]
C_TABLE = [[17, 18, 24, 47] + [99] * 4, [18, 21, 26, 66] + [99] * 4, [24, 26, 56] + [99] * 5,
           [47, 66] + [99] * 6] + [[99] * 8] * 4
# JFIF (ITU-T T.871) full-range colour transform; chroma kept centred on 0 (its +128 and the DCT's
# -128 level shift cancel)
RGB2YCC = [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
YCC2RGB = [[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]]

def _dct_matrix(device):
    """Orthonormal 8-point DCT-II, D[u, x] = c(u) cos((2x + 1) u pi / 16): JPEG's F = D f D^T."""
    u = torch.arange(8, device=device, dtype=torch.float32)
    D = 0.5 * torch.cos((2 * u[None, :] + 1) * u[:, None] * math.pi / 16)
    D[0] /= math.sqrt(2)
    return D

def _quantise(x, step):
    """8x8 block DCT of x (B, c, h, w), h and w multiples of 8, rounded to multiples of step
    (B, 1, 1, 1, 8, 8), and back."""
    B, c, h, w = x.shape
    D = _dct_matrix(x.device)
    blocks = x.view(B, c, h // 8, 8, w // 8, 8).transpose(3, 4)  # (B, c, h/8, w/8, 8, 8)
    coef = D @ blocks @ D.T / step
    coef = coef + (coef.round() - coef).detach()  # straight-through: exact rounding, identity gradient
    return (D.T @ (coef * step) @ D).transpose(3, 4).reshape(B, c, h, w)

def diff_jpeg(img, quality):
    """Batched, differentiable JPEG round trip of img (B, 3, H, W) in [0, 1]; quality a number or (B,)
    tensor in (0, 100]. YCbCr, 4:2:0 chroma (2x2 mean, nearest upsampling), 8x8 DCT, Annex K tables."""
    B, _, H, W = img.shape
    q = _per_image(quality, B, img).view(B, 1, 1, 1, 1, 1)
    # libjpeg's scaling 5000 / q % below 50, 200 - 2 q % above; the tables are not rounded (as basicsr)
    factor = torch.where(q < 50, 50 / q, 2 - q / 50)
    x = F.pad(img * 255, (0, -W % 16, 0, -H % 16))  # whole 16x16 MCUs, zero-padded bottom and right as the reference
    ycc = torch.einsum("ij,bjhw->bihw", img.new_tensor(RGB2YCC), x)
    # reference != libjpeg: basicsr's DiffJPEG applies the luma table transposed; we follow it, since
    # the point is the papers' LR distribution (the chroma table is symmetric)
    y = _quantise(ycc[:, :1] - 128, (img.new_tensor(Y_TABLE).T * factor).clamp_min(1)) + 128
    cbcr = _quantise(F.avg_pool2d(ycc[:, 1:], 2), (img.new_tensor(C_TABLE) * factor).clamp_min(1))
    cbcr = cbcr.repeat_interleave(2, -2).repeat_interleave(2, -1)
    rgb = torch.einsum("ij,bjhw->bihw", img.new_tensor(YCC2RGB), torch.cat([y, cbcr], 1))
    return (rgb[..., :H, :W] / 255).clamp(0, 1)

# -----------------------------------------------------------------------------
# the pipeline

@torch.no_grad()
def degrade(hr, scale=4, opts=DegradeOpts(), generator=None):
    """Real-ESRGAN degradation of hr (B, 3, H, W) in [0, 1]. Returns (lr, gt): lr (B, 3, H // scale,
    W // scale) float32 on the 1/255 grid, gt the USM-sharpened hr (hr itself if not opts.use_usm).
    For speed on GPU pass a generator on the GPU; a CPU generator gives the same draws on any device."""
    o, g = opts, generator
    hr = hr.float()
    B, _, H, W = hr.shape
    if o.bicubic_only:
        x = F.interpolate(hr, size=(H // scale, W // scale), mode="bicubic", align_corners=False, antialias=True)
        return (x.clamp(0, 1) * 255).round() / 255, hr
    dev = _gdev(g, hr)
    coin = lambda p: torch.rand((), generator=g, device=dev).item() < p  # per batch
    u = lambda lo, hi: _rand(B, g, dev, lo, hi).to(hr.device)  # per image
    mode = lambda: RESIZE_MODES[torch.randint(3, (), generator=g, device=dev).item()]

    def resize_factor(probs, lo, hi):  # per batch: up, down or keep
        up, down = _rand(1, g, dev, 1, hi).item(), _rand(1, g, dev, lo, 1).item()
        return (up, down, 1.0)[_choice(probs, 1, g, dev).item()]

    def noise(x, p_gauss, sigma_range, poisson_range, p_gray):
        gray = u(0, 1) < p_gray
        if coin(p_gauss):
            return add_gaussian_noise(x, u(*sigma_range), gray, g)
        return add_poisson_noise(x, u(*poisson_range), gray, g)

    def kernels(sigma, betag, betap, sinc_prob):
        return random_kernel(B, o.kernel_list, o.kernel_prob, sigma, betag, betap, sinc_prob, generator=g,
                             device=dev).to(hr.device)

    # 0. kernels per image, as the dataset draws them; the final sinc has its own cutoff range
    k1 = kernels(o.blur_sigma, o.betag_range, o.betap_range, o.sinc_prob)
    k2 = kernels(o.blur_sigma2, o.betag_range2, o.betap_range2, o.sinc_prob2)
    use_sinc = (u(0, 1) < o.final_sinc_prob).view(B, 1, 1)
    sizes = 7 + 2 * torch.randint(8, (B,), generator=g, device=dev)
    pulse = F.pad(hr.new_ones(1, 1), (10, 10, 10, 10))  # 21x21 identity kernel
    k_sinc = torch.where(use_sinc, sinc_kernel(u(math.pi / 3, math.pi), sizes, 21).to(hr.device), pulse)
    gt = usm_sharp(hr, o.usm_weight, o.usm_threshold) if o.use_usm else hr

    # 1. first degradation: blur, resize, noise, JPEG
    x = filter2d(gt, k1)
    x = F.interpolate(x, scale_factor=resize_factor(o.resize_prob, *o.resize_range), mode=mode())
    x = noise(x, o.gaussian_noise_prob, o.noise_range, o.poisson_scale_range, o.gray_noise_prob)
    x = diff_jpeg(x.clamp(0, 1), u(*o.jpeg_range))

    # 2. second degradation: blur (p second_blur_prob), resize relative to the LR size, noise
    if coin(o.second_blur_prob):
        x = filter2d(x, k2)
    s = resize_factor(o.resize_prob2, *o.resize_range2)
    x = F.interpolate(x, size=(max(1, int(H / scale * s)), max(1, int(W / scale * s))), mode=mode())
    x = noise(x, o.gaussian_noise_prob2, o.noise_range2, o.poisson_scale_range2, o.gray_noise_prob2)

    # 3. [resize to LR + sinc] then JPEG, or JPEG then [resize + sinc], 50/50: the paper found that
    # other orders give twisted lines
    def resize_sinc(x):
        x = F.interpolate(x, size=(H // scale, W // scale), mode=mode())
        return filter2d(x, k_sinc) if use_sinc.any() else x  # a pulse kernel is the identity

    q2 = u(*o.jpeg_range2)
    x = diff_jpeg(resize_sinc(x).clamp(0, 1), q2) if coin(0.5) else resize_sinc(diff_jpeg(x.clamp(0, 1), q2))
    return (x * 255).round().clamp(0, 255) / 255, gt

# -----------------------------------------------------------------------------
# command line: a paired test set from a folder of HR images, or a throughput table

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

def _load(path):
    x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()

def _save(x, path):
    Image.fromarray((x[0].permute(1, 2, 0) * 255).round().byte().cpu().numpy()).save(path)

def bench(opts, scale=4, size=512, batches=(4, 16), images=64):
    """Print images/s of degrade() at size x size HR for each batch size on each device present."""
    print(f"{size}x{size} HR -> {size // scale}x{size // scale} LR, USM {'on' if opts.use_usm else 'off'}, "
          f"{images} images per row, so the random branches average out")
    print("| device | batch | img/s | ms/img |\n|---|---|---|---|")
    for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        name = f"cpu, {torch.get_num_threads()} threads" if d == "cpu" else torch.cuda.get_device_name()
        sync = torch.cuda.synchronize if d == "cuda" else (lambda: None)
        for B in batches:
            g = torch.Generator(d).manual_seed(0)
            # smooth random content, so USM masks and Poisson level counts behave as on photos
            hr = F.interpolate(torch.rand(B, 3, size // 8, size // 8, generator=g, device=d), size=(size, size),
                               mode="bicubic", align_corners=False).clamp(0, 1)
            degrade(hr, scale, opts, g)  # warm-up
            sync()
            t0, n = time.perf_counter(), max(1, images // B)
            for _ in range(n):
                degrade(hr, scale, opts, g)
            sync()
            dt = time.perf_counter() - t0
            print(f"| {name} | {B} | {n * B / dt:.1f} | {1000 * dt / (n * B):.0f} |")

def main():
    p = argparse.ArgumentParser(description="Real-ESRGAN degradation: paired LR images, or --bench")
    p.add_argument("--hr", help="folder of HR images (jpg/jpeg/png/webp/bmp/tif)")
    p.add_argument("--out", help="folder for the LR images, PNG, same file stem")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="realesrgan", choices=sorted(PRESETS))
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--no_usm", action="store_true", help="degrade the HR itself, not its USM-sharpened copy")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bench", action="store_true", help="print an images/s table and exit")
    a = p.parse_args()
    opts = replace(PRESETS[a.preset], use_usm=PRESETS[a.preset].use_usm and not a.no_usm)
    if a.bench:
        return bench(opts, a.scale)
    if not (a.hr and a.out):
        p.error("--hr and --out are required (or --bench)")
    os.makedirs(a.out, exist_ok=True)
    files = sorted(f for f in os.listdir(a.hr) if f.lower().endswith(IMAGE_EXTS))
    for i, f in enumerate(files):
        stem = os.path.splitext(f)[0]
        # One image at a time with a CPU generator seeded from (seed, file stem): an image's LR depends
        # on neither the other files nor the device, and no per-batch draw is shared between images.
        g = torch.Generator().manual_seed(a.seed * 2 ** 32 + zlib.crc32(stem.encode()))
        lr, _ = degrade(_load(os.path.join(a.hr, f)).to(a.device), a.scale, opts, g)
        _save(lr, os.path.join(a.out, stem + ".png"))
        print(f"{i + 1}/{len(files)} {f} -> {stem}.png {tuple(lr.shape[-2:])}")

if __name__ == "__main__":
    main()
