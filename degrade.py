"""
The training data: HR crops served per rank and step (ImageDataset, make_loader), and their
Real-ESRGAN second-order degradation (degrade): batched, seeded, pure torch, on CPU or GPU.

Wang et al., "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic Data",
arXiv 2107.10833, Sec. 3. All four methods make their training LR this way, and eval.py the LR of
HR-only benchmarks (DIV2K-val). k1, k2: random blur kernels, s: the final sinc filter; numbers from
the official x4plus training config:

  gt = USM(hr)                                    sharpened target (optional)
  stage 1:  x = JPEG(noise(resize(gt * k1)))
  stage 2:  x = noise(resize(x * k2))             the k2 blur with p second_blur_prob (0.8)
            x = JPEG(resize_lr(x) * s)  or  resize_lr(JPEG(x)) * s,  50/50
  lr = round(clamp(x, 0, 1) * 255) / 255          LR size (H // scale, W // scale), as the reference

Drawn per image, as the reference: the three kernels, noise sigma or Poisson scale, gray noise,
JPEG quality; per batch: resize (direction, factor, mode), noise type, second blur, JPEG/sinc order.

  lr, gt = degrade(hr, scale=4, opts=PRESETS["seesr"], generator=g)   # hr (B, 3, H, W) in [0, 1]
  python degrade.py --hr DIV2K_valid_HR --out DIV2K_valid_LR --seed 0  # paired LR PNGs (make_lr)

Differences from the reference (basicsr), each on purpose:
  - The 51x51 USM blur runs separably as two matmuls: equal up to float rounding, faster.
  - JPEG rounding is straight-through: DiffJPEG(differentiable=False)'s forward, identity gradient.
  - Quantisation steps floored at 1, as libjpeg: only q > 95 changes (q = 100 would divide by zero).
  - Gray Gaussian noise is drawn per image (basicsr draws one (H, W) field shared by the batch).
"""
import argparse, math, os, sys, zlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import common

# ------------------------------------------------------------ options
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
KERNEL_PROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
RESIZE_MODES = ("area", "bilinear", "bicubic")

@dataclass(frozen=True)
class DegradeOpts:  # defaults: the official x4plus config and basicsr RealESRGANDataset
    use_usm: bool = True  # sharpen the target with USMSharp's defaults
    usm_weight: float = 0.5
    usm_threshold: float = 10.0  # in 8-bit units
    kernel_list: tuple = KERNEL_TYPES  # blur kernels: odd sizes 7..21 zero-padded to 21
    kernel_prob: tuple = KERNEL_PROB
    sinc_prob: float = 0.1
    blur_sigma: tuple = (0.2, 3.0)
    betag_range: tuple = (0.5, 4.0)
    betap_range: tuple = (1.0, 2.0)
    sinc_prob2: float = 0.1  # the second stage's kernel
    blur_sigma2: tuple = (0.2, 1.5)
    betag_range2: tuple = (0.5, 4.0)
    betap_range2: tuple = (1.0, 2.0)
    final_sinc_prob: float = 0.8
    resize_prob: tuple = (0.2, 0.7, 0.1)  # stage 1: up, down, keep
    resize_range: tuple = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple = (1.0, 30.0)  # sigma, 8-bit units
    poisson_scale_range: tuple = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple = (30.0, 95.0)
    second_blur_prob: float = 0.8  # stage 2
    resize_prob2: tuple = (0.3, 0.4, 0.3)
    resize_range2: tuple = (0.3, 1.2)  # relative to the final LR size
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple = (1.0, 25.0)
    poisson_scale_range2: tuple = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple = (30.0, 95.0)
    bicubic_only: bool = False  # classical: bicubic downsampling only, none of the above

PRESETS = {
    "realesrgan": DegradeOpts(),
    # SeeSR's milder ranges, from its release; kernels as Real-ESRGAN
    "seesr": DegradeOpts(resize_range=(0.3, 1.5), noise_range=(1.0, 15.0), poisson_scale_range=(0.05, 2.0),
                         jpeg_range=(60.0, 95.0), second_blur_prob=0.5, resize_range2=(0.6, 1.2),
                         noise_range2=(1.0, 12.0), poisson_scale_range2=(0.05, 1.0), jpeg_range2=(60.0, 100.0)),
    "bicubic": DegradeOpts(use_usm=False, bicubic_only=True),  # ours: classical x4, the mini's LR
}

def check_preset(name):
    """A --degrade value: one of PRESETS, or a clear error."""
    if name not in PRESETS:
        raise SystemExit(f"--degrade {name!r}: choose from {', '.join(PRESETS)}")

# ------------------------------------------------------------ draws on the generator's device
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

# ------------------------------------------------------------ blur: kernels, filtering, sharpening
def _support(k, half):
    """k (n, K, K) zeroed outside each centred (2 half + 1)^2 window, renormalised to sum 1: the
    reference's smaller kernel zero-padded to K."""
    K = k.shape[-1]
    a = (torch.arange(K, device=k.device) - K // 2).abs()
    k = k * (torch.maximum(a[:, None], a[None, :]) <= half.view(-1, 1, 1))
    return k / k.sum((-2, -1), keepdim=True)

def sinc_kernel(cutoff, size, pad_to=None):
    """Circular low-pass (2-D sinc) kernels, normalised, as basicsr circular_lowpass_kernel:
    c J1(c r) / (2 pi r), c^2 / (4 pi) at r = 0; cutoff c in radians (pi: Nyquist), size odd, either
    a (n,) tensor. Returns (n, K, K), 0 outside each size, K = pad_to or the largest size."""
    cutoff = torch.as_tensor(cutoff, dtype=torch.float64).reshape(-1, 1, 1)
    size = torch.as_tensor(size, device=cutoff.device).reshape(-1)
    K = pad_to or int(size.max())
    a = torch.arange(K, device=cutoff.device, dtype=torch.float64) - K // 2
    r = (a[:, None] ** 2 + a[None, :] ** 2).sqrt()
    k = cutoff * torch.special.bessel_j1(cutoff * r) / (2 * math.pi * r.clamp_min(1e-9))
    k = torch.where(r == 0, cutoff ** 2 / (4 * math.pi), k)  # the limit at r = 0
    n = max(len(cutoff), len(size))
    return _support(k.expand(n, K, K), (size // 2).expand(n)).float()

def random_kernel(n, kernel_list=KERNEL_TYPES, kernel_prob=KERNEL_PROB, sigma_range=(0.2, 3.0), betag_range=(0.5, 4.0),
                  betap_range=(1.0, 2.0), sinc_prob=0.1, sizes=(7, 21), pad_to=21, generator=None, device="cpu"):
    """n random blur kernels (n, pad_to, pad_to), each summing to 1, drawn as RealESRGANDataset:
    odd size in sizes; with p sinc_prob a sinc, cutoff U[pi/3, pi] below size 13, else U[pi/5, pi];
    else a kernel_list type: (generalized) Gaussian exp(-0.5 q^beta) or plateau 1 / (q^beta + 1),
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
    # beta: U[lo, 1] or U[1, hi] with p 0.5 each, as basicsr's random_bivariate_* kernels
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

def filter2d(img, kernels):
    """Filter each image of img (B, C, H, W) with its own kernel (B, k, k), or one (k, k) for all;
    k odd, same size, reflect-padded (replicated below k // 2 + 1 pixels), as basicsr filter2D."""
    B, C, H, W = img.shape
    k, p = kernels.shape[-1], kernels.shape[-1] // 2
    # correlation, as the reference; every kernel here is point-symmetric, so it is also convolution
    w = kernels.to(img).expand(B, k, k).repeat_interleave(C, 0).unsqueeze(1)  # (B*C, 1, k, k)
    x = F.pad(img, (p, p, p, p), mode="reflect" if p < min(H, W) else "replicate")
    return F.conv2d(x.reshape(1, B * C, H + 2 * p, W + 2 * p), w, groups=B * C).view(B, C, H, W)

def _reflect_blur_matrix(n, g):
    """(n, n) M: M @ x filters x along its first axis with the 1-D kernel g, reflect-padded."""
    r = g.numel() // 2
    idx = (torch.arange(n, device=g.device)[:, None] + torch.arange(-r, r + 1, device=g.device)).abs()
    # clamp: tiny images only
    idx = torch.where(idx > n - 1, 2 * (n - 1) - idx, idx).clamp(0, n - 1)
    return torch.zeros(n, n, device=g.device, dtype=g.dtype).scatter_add_(1, idx, g.expand(n, -1).contiguous())

def usm_sharp(img, weight=0.5, threshold=10.0, size=51, sigma=8.0):
    """Unsharp masking as Real-ESRGAN's USMSharp: sharp = clamp(img + weight (img - blur)), blended
    in by a soft mask, the blurred indicator of |img - blur| > threshold / 255. size 51: USMSharp's
    radius 50 made odd; sigma 8: cv2.getGaussianKernel(51, 0)'s 0.3 ((51 - 1) / 2 - 1) + 0.8."""
    H, W = img.shape[-2:]
    g = torch.exp(-(torch.arange(size, device=img.device, dtype=img.dtype) - size // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    # separable: two matmuls with banded reflect matrices, faster on CPU than a 51x51 or 1-D conv
    Mh, Mw = _reflect_blur_matrix(H, g), _reflect_blur_matrix(W, g)
    blur = lambda x: Mh @ x @ Mw.T
    residual = img - blur(img)
    soft_mask = blur((residual.abs() * 255 > threshold).to(img.dtype))
    sharp = (img + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img

# ------------------------------------------------------------ noise
def add_gaussian_noise(img, sigma, gray=False, generator=None):
    """clamp(img + N(0, (sigma / 255)^2)), with one field for all channels where gray.
    sigma and gray are numbers or (B,) tensors."""
    B, _, H, W = img.shape
    dev = generator.device if generator is not None else img.device
    noise = torch.randn(img.shape, generator=generator, device=dev).to(img)
    gray = _per_image(gray, B, img) > 0
    if gray.any():
        noise = torch.where(gray, torch.randn((B, 1, H, W), generator=generator, device=dev).to(img), noise)
    return (img + noise * _per_image(sigma, B, img) / 255).clamp(0, 1)

def _poisson_levels(x):
    """Per image (B, 1, 1, 1): 2^ceil(log2(distinct 8-bit values)) of x, given on the 8-bit grid."""
    B = x.shape[0]
    q = (x * 255).round().long().reshape(B, -1) + 256 * torch.arange(B, device=x.device)[:, None]
    n_unique = (torch.bincount(q.reshape(-1), minlength=256 * B).view(B, 256) > 0).sum(1)
    return (2.0 ** torch.log2(n_unique.double()).ceil()).float().view(B, 1, 1, 1)

def add_poisson_noise(img, scale, gray=False, generator=None):
    """Shot noise as basicsr generate_poisson_noise_pt: x = img on the 8-bit grid,
    L = _poisson_levels(x), noise = Poisson(x L) / L - x, out = clamp(img + scale noise); a gray
    image takes its luma's noise on all channels. scale and gray are numbers or (B,) tensors."""
    B, dev = img.shape[0], generator.device if generator is not None else img.device
    def shot(x):
        x = (x * 255).round().clamp(0, 255) / 255
        L = _poisson_levels(x)
        return torch.poisson((x * L).to(dev), generator=generator).to(img) / L - x
    noise = shot(img)
    gray = _per_image(gray, B, img) > 0
    if gray.any():
        # torchvision rgb_to_grayscale, as the reference
        luma = (img * img.new_tensor((0.2989, 0.587, 0.114)).view(1, 3, 1, 1)).sum(1, keepdim=True)
        noise = torch.where(gray, shot(luma).expand_as(img), noise)
    return (img + noise * _per_image(scale, B, img)).clamp(0, 1)

# ------------------------------------------------------------ JPEG
# ITU-T T.81 Annex K quantisation tables as printed (row = vertical frequency)
Y_TABLE = [[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
           [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
           [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]]
C_TABLE = [[17, 18, 24, 47] + [99] * 4, [18, 21, 26, 66] + [99] * 4, [24, 26, 56] + [99] * 5,
           [47, 66] + [99] * 6] + [[99] * 8] * 4
# JFIF (T.871) full-range colour transform; chroma centred on 0, as its +128 cancels the DCT's -128
RGB2YCC = [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
YCC2RGB = [[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]]

def _quantise(x, step):
    """x (B, c, h, w), h and w multiples of 8, through an 8x8 block DCT rounded to multiples of
    step (B, 1, 1, 1, 8, 8) and back."""
    B, c, h, w = x.shape
    # orthonormal 8-point DCT-II, D[u, x] = c(u) cos((2x + 1) u pi / 16): JPEG's F = D f D^T
    u = torch.arange(8, device=x.device, dtype=torch.float32)
    D = 0.5 * torch.cos((2 * u[None, :] + 1) * u[:, None] * math.pi / 16)
    D[0] /= math.sqrt(2)
    blocks = x.view(B, c, h // 8, 8, w // 8, 8).transpose(3, 4)  # (B, c, h/8, w/8, 8, 8)
    coef = D @ blocks @ D.T / step
    # straight-through: exact rounding, identity gradient
    coef = coef + (coef.round() - coef).detach()
    return (D.T @ (coef * step) @ D).transpose(3, 4).reshape(B, c, h, w)

def diff_jpeg(img, quality):
    """Batched, differentiable JPEG round trip of img (B, 3, H, W) in [0, 1], quality a number or
    (B,) tensor in (0, 100]: YCbCr, 4:2:0 chroma (2x2 mean, nearest up), 8x8 DCT, Annex K tables."""
    B, _, H, W = img.shape
    q = _per_image(quality, B, img).view(B, 1, 1, 1, 1, 1)
    # libjpeg's scaling, 5000 / q % below 50 and 200 - 2 q % above; tables not rounded, as basicsr
    factor = torch.where(q < 50, 50 / q, 2 - q / 50)
    x = F.pad(img * 255, (0, -W % 16, 0, -H % 16))  # whole 16x16 MCUs, zero-padded as the reference
    ycc = torch.einsum("ij,bjhw->bihw", img.new_tensor(RGB2YCC), x)
    # reference != libjpeg: basicsr transposes the luma table; kept, as it made the papers' LR
    y = _quantise(ycc[:, :1] - 128, (img.new_tensor(Y_TABLE).T * factor).clamp_min(1)) + 128
    cbcr = _quantise(F.avg_pool2d(ycc[:, 1:], 2), (img.new_tensor(C_TABLE) * factor).clamp_min(1))
    cbcr = cbcr.repeat_interleave(2, -2).repeat_interleave(2, -1)
    rgb = torch.einsum("ij,bjhw->bihw", img.new_tensor(YCC2RGB), torch.cat([y, cbcr], 1))
    return (rgb[..., :H, :W] / 255).clamp(0, 1)

# ------------------------------------------------------------ the pipeline
@torch.no_grad()
def degrade(hr, scale=4, opts=DegradeOpts(), generator=None):
    """hr (B, 3, H, W) in [0, 1] -> lr (B, 3, H // scale, W // scale), float32 on the 1/255 grid,
    and gt: hr, USM-sharpened if opts.use_usm. A CPU generator draws the same on any device."""
    o, g, hr = opts, generator, hr.float()
    B, _, H, W = hr.shape
    if o.bicubic_only:
        x = F.interpolate(hr, size=(H // scale, W // scale), mode="bicubic", align_corners=False, antialias=True)
        return (x.clamp(0, 1) * 255).round() / 255, hr
    dev = g.device if g is not None else hr.device
    coin = lambda p: torch.rand((), generator=g, device=dev).item() < p  # per batch
    u = lambda lo, hi: _rand(B, g, dev, lo, hi).to(hr.device)  # per image
    mode = lambda: RESIZE_MODES[torch.randint(3, (), generator=g, device=dev).item()]
    kernels = lambda *a: random_kernel(B, o.kernel_list, o.kernel_prob, *a, generator=g, device=dev).to(hr.device)

    def resize_factor(probs, lo, hi):  # per batch: up, down or keep
        up, down = _rand(1, g, dev, 1, hi).item(), _rand(1, g, dev, lo, 1).item()
        return (up, down, 1.0)[_choice(probs, 1, g, dev).item()]

    def noise(x, p_gauss, sigma_range, poisson_range, p_gray):
        gray = u(0, 1) < p_gray
        if coin(p_gauss):
            return add_gaussian_noise(x, u(*sigma_range), gray, g)
        return add_poisson_noise(x, u(*poisson_range), gray, g)

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

    # 3. [resize to LR + sinc] then JPEG, or JPEG then [resize + sinc], 50/50, as the reference
    def resize_sinc(x):
        x = F.interpolate(x, size=(H // scale, W // scale), mode=mode())
        return filter2d(x, k_sinc) if use_sinc.any() else x  # a pulse kernel is the identity
    q2 = u(*o.jpeg_range2)
    x = diff_jpeg(resize_sinc(x).clamp(0, 1), q2) if coin(0.5) else resize_sinc(diff_jpeg(x.clamp(0, 1), q2))
    return (x * 255).round().clamp(0, 255) / 255, gt

# ------------------------------------------------------------ training data, per rank and step
class ImageDataset(torch.utils.data.Dataset):
    """Random crop + flip of an image source, keyed by (index, seed): a crop is a pure function of
    the data position, so resume and any number of ranks see the same samples. Unreadable images
    are skipped, small ones upscaled."""

    def __init__(self, src="sample", crop=512, data_root="data"):
        self.crop, self.said = crop, set()
        self.items = common.sample_photos() if src == "sample" else common.list_images(src, data_root)

    def __len__(self):
        return len(self.items)

    def _say(self, msg):  # each warning once
        if msg not in self.said:
            self.said.add(msg)
            print(f"warning: {msg}", file=sys.stderr)

    def __getitem__(self, key):
        i, seed = key
        # the next readable image
        for i in [(i + k) % len(self.items) for k in range(len(self.items))]:
            try:
                x = self.items[i] if torch.is_tensor(self.items[i]) else common.load_image(self.items[i])
                break
            except Exception as e:
                self._say(f"skipping unreadable image {self.items[i]}: {e}")
        else:
            raise RuntimeError("no readable image in the data source")
        if min(x.shape[1:]) < self.crop:
            self._say(f"image {i} is {x.shape[2]}x{x.shape[1]}, smaller than crop {self.crop}: upscaling")
            size = [max(self.crop, round(n * self.crop / min(x.shape[1:]))) for n in x.shape[1:]]
            x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)
        return common.random_crop(x, self.crop, seed)

class StepSampler(torch.utils.data.Sampler):
    """Infinite, resumable, rank-aware sampler of (index, seed) keys: step s's global batch is data
    positions [s GB, (s+1) GB), shuffled per epoch (seed + epoch); each rank takes its slice."""

    def __init__(self, n, global_batch, rank, world, seed, start_step=0):
        self.n, self.gb, self.rank, self.world, self.seed, self.start = n, global_batch, rank, world, seed, start_step

    def __iter__(self):
        per, step, epoch, perm = self.gb // self.world, self.start, None, None
        while True:
            for pos in range(step * self.gb + self.rank * per, step * self.gb + (self.rank + 1) * per):
                if epoch != pos // self.n:
                    epoch = pos // self.n
                    perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                yield int(perm[pos % self.n]), self.seed * 1_000_003 + pos
            step += 1

def make_loader(ds, cfg, rank, world, start_step):
    """Per-rank iterator of micro-batches of ds, and accumulation steps; --batch_size is global."""
    if cfg.batch_size % (world * cfg.micro_batch):
        raise SystemExit(f"--batch_size {cfg.batch_size} must divide by ranks {world} x --micro_batch "
                         f"{cfg.micro_batch}")
    sampler = StepSampler(len(ds), cfg.batch_size, rank, world, cfg.seed, start_step)
    # its own generator: else a DataLoader draws a seed from the global RNG, and a resume diverges
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.micro_batch, sampler=sampler, num_workers=cfg.num_workers,
                                         persistent_workers=cfg.num_workers > 0, generator=torch.Generator())
    return iter(loader), cfg.batch_size // (world * cfg.micro_batch)

# ------------------------------------------------------------ paired LR files from HR files
def make_lr(hr_files, lr_dir, seed=0, opts=PRESETS["realesrgan"], scale=4, device="cpu"):
    """lr_dir/<stem>.png for each HR file without one: the HR cropped to a multiple of scale
    (top-left kept), degraded alone with a CPU generator seeded from (seed, stem): its draws depend
    on neither the other files nor the device."""
    from tqdm import tqdm
    for f in tqdm(hr_files, desc="LR", disable=len(hr_files) < 2):
        stem = os.path.splitext(os.path.basename(f))[0]
        if os.path.exists(out := os.path.join(lr_dir, stem + ".png")):
            continue
        x_hr = common.load_image(f)  # (3, H, W)
        x_hr = x_hr[:, : x_hr.shape[1] // scale * scale, : x_hr.shape[2] // scale * scale]
        g = torch.Generator().manual_seed(zlib.crc32(stem.encode(), seed))
        x_lr, _ = degrade(x_hr[None].to(device), scale, opts, g)  # (1, 3, H / scale, W / scale)
        # hidden until complete
        common.save_image(x_lr, tmp := os.path.join(lr_dir, f".{stem}.png"))
        os.replace(tmp, out)

def main():
    p = argparse.ArgumentParser(description="Real-ESRGAN degradation: a folder of LR PNGs from a folder of HR images")
    p.add_argument("--hr", required=True, help=f"folder of HR images ({', '.join(common.IMG_EXTS)})")
    p.add_argument("--out", required=True, help="folder for the LR images: PNG, same file stem; existing ones kept")
    p.add_argument("--seed", type=int, default=0, help="each image's draws are seeded from (seed, file stem)")
    p.add_argument("--preset", default="realesrgan", choices=sorted(PRESETS))
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--no_usm", action="store_true", help="degrade the HR itself, not its USM-sharpened copy")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    opts = replace(PRESETS[a.preset], use_usm=PRESETS[a.preset].use_usm and not a.no_usm)
    make_lr(common.list_images(a.hr), a.out, a.seed, opts, a.scale, a.device)

if __name__ == "__main__":
    main()
