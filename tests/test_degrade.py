"""Tests for degrade.py: each piece against an independent computation or a property of its math."""

import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import load_image, save_image  # noqa: E402
from degrade import (KERNEL_TYPES, PRESETS, Y_TABLE, DegradeOpts, add_gaussian_noise,  # noqa: E402
                     add_poisson_noise, degrade, diff_jpeg, filter2d, make_lr, random_kernel, sinc_kernel, usm_sharp)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def photo(B=2, H=64, W=64, seed=0):
    """Photo-like content: gray detail at a 4-pixel scale, colour at a 16-pixel scale (as in photos,
    chroma has little high-frequency energy), both uniform noise on a coarse grid, bicubic-upsampled."""
    up = lambda x: F.interpolate(x, size=(H, W), mode="bicubic", align_corners=False)
    g = gen(seed)
    detail = torch.rand(B, 1, max(2, H // 4), max(2, W // 4), generator=g)
    colour = torch.rand(B, 3, max(2, H // 16), max(2, W // 16), generator=g)
    return (0.6 * up(detail) + 0.4 * up(colour)).clamp(0, 1)


def psnr(a, b):
    return -10 * math.log10(((a - b) ** 2).mean().item())

# -----------------------------------------------------------------------------
# kernels


@pytest.mark.parametrize("kind", KERNEL_TYPES + ("sinc",))
def test_kernel_sum_shape_symmetry_support(kind):
    n = 256
    if kind == "sinc":
        k = random_kernel(n, sinc_prob=1.0, generator=gen())
    else:
        k = random_kernel(n, kernel_list=(kind,), kernel_prob=(1.0,), sinc_prob=0.0, generator=gen())
    assert k.shape == (n, 21, 21)
    assert torch.allclose(k.sum((1, 2)), torch.ones(n), atol=1e-5)
    assert torch.allclose(k, k.flip(-1, -2), atol=1e-7)  # every type is point-symmetric
    if kind.endswith("aniso"):  # rotated: generally not mirror-symmetric
        assert (k - k.flip(-1)).abs().amax((1, 2)).median() > 1e-3
    else:  # radial
        assert torch.allclose(k, k.flip(-1), atol=1e-7)
        assert torch.allclose(k, k.transpose(1, 2), atol=1e-7)
    # support: a centred odd square (zero padding of a 7..21 kernel); heavy-tailed types fill theirs,
    # so every size shows up (Gaussians with small sigma underflow to 0 inside theirs)
    rows = k.ne(0).any(2)
    side = rows.sum(1)
    first = rows.float().argmax(1)
    assert torch.equal(first, (21 - side) // 2) and bool((side % 2 == 1).all())
    if kind.startswith("plateau") or kind == "sinc":
        assert set(side.tolist()) == set(range(7, 22, 2))


def test_gaussian_kernels_match_closed_form():
    s = 1.7
    k = random_kernel(4, ("iso",), (1.0,), sigma_range=(s, s), sinc_prob=0.0, sizes=(21, 21), generator=gen())
    g = torch.exp(-torch.arange(-10.0, 11.0) ** 2 / (2 * s * s))
    assert torch.allclose(k, (torch.outer(g, g) / g.sum() ** 2).expand(4, 21, 21), atol=1e-7)
    # anisotropic: the kernel's covariance has eigenvalues sx^2, sy^2 within the sigma range
    k = random_kernel(64, ("aniso",), (1.0,), sigma_range=(1.5, 2.5), sinc_prob=0.0, sizes=(21, 21),
                      generator=gen(1)).double()
    a = torch.arange(-10.0, 11.0, dtype=torch.float64)
    y, x = torch.meshgrid(a, a, indexing="ij")
    cov = torch.stack([torch.stack([(k * x * x).sum((1, 2)), (k * x * y).sum((1, 2))], 1),
                       torch.stack([(k * x * y).sum((1, 2)), (k * y * y).sum((1, 2))], 1)], 1)
    ev = torch.linalg.eigvalsh(cov)
    assert ev.min() > 1.5 ** 2 - 1e-3 and ev.max() < 2.5 ** 2 + 1e-3
    assert (ev[:, 1] / ev[:, 0]).median() > 1.2
    # generalized Gaussian with beta = 1 is the Gaussian: the same draws give the same kernels
    a = random_kernel(64, ("aniso",), (1.0,), sinc_prob=0.0, generator=gen(3))
    b = random_kernel(64, ("generalized_aniso",), (1.0,), betag_range=(1.0, 1.0), sinc_prob=0.0, generator=gen(3))
    assert torch.allclose(a, b, atol=1e-6)


def _j1(x):  # Bessel J1 from its power series
    return sum((-1) ** m / (math.factorial(m) * math.factorial(m + 1)) * (x / 2) ** (2 * m + 1) for m in range(40))


def test_sinc_kernel_matches_bessel_formula():
    wc, size = 1.3, 13
    ref = torch.zeros(21, 21, dtype=torch.float64)
    for i in range(4, 17):
        for j in range(4, 17):
            r = math.hypot(i - 10, j - 10)
            ref[i, j] = wc ** 2 / (4 * math.pi) if r == 0 else wc * _j1(wc * r) / (2 * math.pi * r)
    k = sinc_kernel(wc, size, pad_to=21)
    assert k.shape == (1, 21, 21)
    assert torch.allclose(k[0].double(), ref / ref.sum(), atol=1e-6)
    # a batch of cutoffs and sizes, unpadded
    k = sinc_kernel(torch.tensor([1.0, 2.0]), torch.tensor([7, 9]))
    assert k.shape == (2, 9, 9) and bool((k[0, 0] == 0).all()) and bool((k[1, 0] != 0).any())

# -----------------------------------------------------------------------------
# filtering and sharpening


def test_filter2d_identity_shift_and_direct_sum():
    img = torch.rand(3, 3, 20, 24, generator=gen())
    delta = torch.zeros(3, 21, 21)
    delta[:, 10, 10] = 1
    assert torch.equal(filter2d(img, delta), img)
    shift = delta.clone()  # image 1 only: a tap right of centre reads the pixel to the right
    shift[1, 10, 10], shift[1, 10, 11] = 0, 1
    out = filter2d(img, shift)
    assert torch.equal(out[0], img[0]) and torch.equal(out[2], img[2])
    assert torch.equal(out[1, :, :, :-1], img[1, :, :, 1:])
    k = random_kernel(3, generator=gen(1))
    xp = F.pad(img, (10, 10, 10, 10), mode="reflect")
    ref = sum(k[:, i, j].view(3, 1, 1, 1) * xp[:, :, i:i + 20, j:j + 24] for i in range(21) for j in range(21))
    assert torch.allclose(filter2d(img, k), ref, atol=1e-6)


def test_usm_identity_on_flat_and_equals_full_2d_blur():
    flat = torch.full((2, 3, 40, 50), 0.37)
    assert torch.allclose(usm_sharp(flat), flat, atol=1e-6)
    # the reference's way: full 51x51 2-D blur with reflect padding
    img = photo(2, 64, 80)
    g = torch.exp(-(torch.arange(51.0) - 25) ** 2 / (2 * 8.0 ** 2))
    k = torch.outer(g, g) / g.sum() ** 2
    residual = img - filter2d(img, k)
    soft = filter2d((residual.abs() * 255 > 10).float(), k)
    ref = soft * (img + 0.5 * residual).clamp(0, 1) + (1 - soft) * img
    out = usm_sharp(img)
    assert torch.allclose(out, ref, atol=1e-5)
    grad = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()
    assert grad(out) > 1.05 * grad(img)

# -----------------------------------------------------------------------------
# noise


def test_gaussian_noise_sigma_and_gray():
    img = torch.full((2, 3, 128, 128), 0.5)
    out = add_gaussian_noise(img, torch.tensor([5.0, 20.0]), torch.tensor([False, True]), generator=gen())
    n = (out - img) * 255
    assert torch.allclose(n.flatten(1).std(1), torch.tensor([5.0, 20.0]), rtol=0.03)
    assert n.mean().abs() < 0.2
    assert torch.corrcoef(n[0].flatten(1))[0, 1].abs() < 0.05  # colour noise: independent channels
    assert torch.allclose(n[1, 0], n[1, 1], atol=1e-4) and torch.allclose(n[1, 0], n[1, 2], atol=1e-4)


def _ramp_and_flat(flat_rgb, size=128):
    """Left half: a gray ramp through all 256 levels; right half: a flat colour, where noise is measured."""
    img = torch.empty(1, 3, size, 2 * size)
    img[..., :size] = (torch.arange(size * size) % 256).float().view(size, size) / 255
    img[..., size:] = torch.tensor(flat_rgb).view(3, 1, 1)
    return img


def test_poisson_noise_level_and_level_count():
    v = 128 / 255
    img = _ramp_and_flat((v, v, v))
    n = (add_poisson_noise(img, 2.0, generator=gen()) - img)[..., 128:]
    expected = 2.0 * math.sqrt(v / 256)  # std of Poisson(v L) / L is sqrt(v / L), L = 256 levels
    assert abs(n.std().item() / expected - 1) < 0.03 and abs(n.mean().item()) < 0.1 * expected
    img[..., :128] = (img[..., :128] > 0.5).float()  # three distinct values: L = 2^ceil(log2 3) = 4
    n = (add_poisson_noise(img, 0.2, generator=gen()) - img)[..., 128:]
    assert abs(n.std().item() / (0.2 * math.sqrt(v / 4)) - 1) < 0.03


def test_poisson_gray_noise_uses_luma():
    rgb = (0.8, 0.5, 0.2)
    img = _ramp_and_flat(rgb)
    n = (add_poisson_noise(img, 1.0, gray=True, generator=gen()) - img)[0, :, :, 128:]
    assert torch.allclose(n[0], n[1], atol=1e-5) and torch.allclose(n[0], n[2], atol=1e-5)
    luma = round(255 * (0.2989 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])) / 255
    assert abs(n[0].std().item() / math.sqrt(luma / 256) - 1) < 0.03
    n = (add_poisson_noise(img, 1.0, gray=False, generator=gen()) - img)[0, :, :, 128:]  # colour: per channel
    for c in range(3):
        assert abs(n[c].std().item() / math.sqrt(round(255 * rgb[c]) / 255 / 256) - 1) < 0.03

# -----------------------------------------------------------------------------
# JPEG


def test_diff_jpeg_quality_ordering():
    img = photo(1, 64, 64)
    p = {q: psnr(diff_jpeg(img, q), img) for q in (100, 90, 70, 50, 30, 10)}
    assert p[100] > 40
    assert p[100] > p[90] > p[70] > p[50] > p[30] > p[10]
    both = diff_jpeg(img.expand(2, -1, -1, -1), torch.tensor([20.0, 90.0]))  # per-image quality
    assert torch.allclose(both[0], diff_jpeg(img, 20.0)[0], atol=1e-6)
    assert torch.allclose(both[1], diff_jpeg(img, 90.0)[0], atol=1e-6)


def _dct_matrix():
    D = np.array([[math.cos((2 * x + 1) * u * math.pi / 16) for x in range(8)] for u in range(8)]) / 2
    D[0] /= math.sqrt(2)
    return D


@pytest.mark.parametrize("quality, factor", [(25, 2.0), (60, 0.8), (75, 0.5)])
def test_diff_jpeg_quantises_with_scaled_unrounded_table(quality, factor):
    # a gray image (zero chroma) of one DCT basis pattern, amplitude a at (row freq u, column freq v)
    D, (u, v), a = _dct_matrix(), (0, 1), 31.0
    block = 128 + a * np.outer(D[u], D[v])
    img = torch.tensor(np.tile(block, (2, 2)), dtype=torch.float32).expand(1, 3, 16, 16) / 255
    out = diff_jpeg(img, float(quality))[0].double() * 255
    assert torch.allclose(out[0], out[1], atol=1e-3) and torch.allclose(out[0], out[2], atol=1e-3)
    coef = D @ (out[0, :8, :8].numpy() - 128) @ D.T
    step = Y_TABLE[v][u] * factor  # the luma table as basicsr applies it (transposed), not rounded
    expected = np.zeros((8, 8))
    expected[u, v] = round(a / step) * step
    assert np.allclose(coef, expected, atol=1e-2)


@pytest.mark.parametrize("H, W", [(37, 50), (16, 23), (9, 9)])
def test_diff_jpeg_pads_with_zeros_as_the_reference(H, W):
    """basicsr's DiffJPEG zero-pads the bottom and right to a multiple of 16 and crops back: the same as compressing
    the zero-padded image (a multiple of 16, so nothing more is padded) and cropping."""
    img = photo(2, H, W)
    padded = F.pad(img, (0, -W % 16, 0, -H % 16))
    q = torch.tensor([35.0, 80.0])
    torch.testing.assert_close(diff_jpeg(img, q), diff_jpeg(padded, q)[..., :H, :W], atol=1e-6, rtol=0)


def test_diff_jpeg_is_differentiable():
    x = (0.1 + 0.8 * photo(2, 32, 48)).requires_grad_()
    diff_jpeg(x, torch.tensor([30.0, 80.0])).sum().backward()
    # straight-through rounding: the backward pass is the codec without quantisation, and that map
    # (colour transform, 2x2 chroma mean + repeat, inverse transform) sends all-ones to all-ones
    assert torch.allclose(x.grad, torch.ones_like(x), atol=1e-4)

# -----------------------------------------------------------------------------
# the pipeline


def test_same_seed_same_output_and_per_image_draws():
    hr = photo(4, 64, 64)
    a, b, c = (degrade(hr, generator=gen(s))[0] for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    same = degrade(hr[:1].expand(4, -1, -1, -1).contiguous(), generator=gen(1))[0]
    assert all(not torch.equal(same[0], same[i]) for i in range(1, 4))


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"bicubic"}))
def test_degrade_range_size_dtype(preset):
    hr = photo(4, 96, 128)
    for seed in range(3):
        lr, gt = degrade(hr, 4, PRESETS[preset], gen(seed))
        assert lr.shape == (4, 3, 24, 32) and lr.dtype == torch.float32
        assert lr.min() >= 0 and lr.max() <= 1
        assert torch.equal((lr * 255).round() / 255, lr)  # on the 8-bit grid
        assert gt.shape == hr.shape and not torch.equal(gt, hr)  # USM sharpened
        clean = F.interpolate(hr, size=(24, 32), mode="bicubic", antialias=True, align_corners=False)
        assert (lr.mean((2, 3)) - clean.mean((2, 3))).abs().max() < 0.1
    lr, gt = degrade(hr, 4, DegradeOpts(use_usm=False), gen())
    assert gt is hr or torch.equal(gt, hr)


def test_seesr_preset_is_milder():
    hr = photo(4, 64, 64)
    clean = F.interpolate(hr, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    mean_psnr = {p: np.mean([psnr(degrade(hr, 4, PRESETS[p], gen(s))[0], clean) for s in range(16)])
                 for p in PRESETS}
    assert mean_psnr["seesr"] > mean_psnr["realesrgan"] + 1.0
    s = PRESETS["seesr"]
    assert (s.resize_range, s.noise_range, s.poisson_scale_range, s.jpeg_range) == \
        ((0.3, 1.5), (1, 15), (0.05, 2), (60, 95))
    assert (s.second_blur_prob, s.resize_range2, s.noise_range2, s.poisson_scale_range2, s.jpeg_range2) == \
        (0.5, (0.6, 1.2), (1, 12), (0.05, 1.0), (60, 100))


def test_bicubic_preset_is_pil_bicubic_downsampling():
    """The classical setting: LR = PIL's antialiased bicubic x4 (an independent implementation) on the
    8-bit grid, gt = hr unsharpened, and no random draw (the generator is not touched)."""
    hr = (photo(2, 64, 96) * 255).round() / 255
    g = gen(3)
    state = g.get_state()
    lr, gt = degrade(hr, 4, PRESETS["bicubic"], g)
    assert torch.equal(g.get_state(), state) and torch.equal(gt, hr)
    assert lr.shape == (2, 3, 16, 24) and torch.equal((lr * 255).round() / 255, lr)
    for i in range(2):
        im = Image.fromarray((hr[i].permute(1, 2, 0) * 255).round().byte().numpy())
        ref = torch.from_numpy(np.asarray(im.resize((24, 16), Image.BICUBIC), dtype=np.float32) / 255).permute(2, 0, 1)
        assert (lr[i] - ref).abs().max() <= 2 / 255  # float vs PIL's fixed-point arithmetic
    assert PRESETS["bicubic"].use_usm is False


@pytest.mark.parametrize("H, W", [(67, 93), (33, 45), (17, 130)])
def test_odd_sizes(H, W):
    for seed in range(4):
        lr, gt = degrade(photo(2, H, W), generator=gen(seed))
        assert lr.shape == (2, 3, H // 4, W // 4) and gt.shape == (2, 3, H, W)
        assert bool(torch.isfinite(lr).all())


def test_make_lr_seeded_per_stem_cropped_and_kept(tmp_path):
    """One LR per HR: the HR cropped to a multiple of 4 (top-left), degraded alone with a generator seeded from
    (seed, stem), so a stem's LR is the same whatever the other files; an existing LR file is never rewritten."""
    sizes = {"a": (48, 64), "b": (37, 53), "c": (40, 44)}
    hr = {k: tmp_path / "hr" / f"{k}.png" for k in sizes}
    for i, (k, (h, w)) in enumerate(sizes.items()):
        save_image(photo(1, h, w, seed=i), str(hr[k]))
    lr = tmp_path / "lr"
    lr.mkdir()
    (lr / "c.png").write_bytes(b"made before")
    make_lr([str(hr[k]) for k in sizes], str(lr), seed=3)
    assert sorted(os.listdir(lr)) == ["a.png", "b.png", "c.png"]  # no hidden temporary file left
    assert (lr / "c.png").read_bytes() == b"made before"
    x = load_image(str(hr["b"]))[:, :36, :52]  # 37x53 -> 36x52
    g = torch.Generator().manual_seed(zlib.crc32(b"b", 3))
    assert torch.equal(load_image(str(lr / "b.png")), degrade(x[None], 4, PRESETS["realesrgan"], g)[0][0])
    save_image(x, str(tmp_path / "crop" / "b.png"))  # the same stem, already cropped, alone in another folder
    make_lr([str(tmp_path / "crop" / "b.png")], str(tmp_path / "alone"), seed=3)
    assert (tmp_path / "alone" / "b.png").read_bytes() == (lr / "b.png").read_bytes()
    mtime = os.path.getmtime(lr / "a.png")
    make_lr([str(hr["a"])], str(lr), seed=3)
    assert os.path.getmtime(lr / "a.png") == mtime
    make_lr([str(hr["a"])], str(tmp_path / "seed0"), seed=0)  # seed 0: the crc32 of the stem alone, as before
    make_lr([str(hr["a"])], str(tmp_path / "seed4"), seed=4)
    lrs = [load_image(str(tmp_path / d / "a.png")) for d in ("seed0", "seed4")] + [load_image(str(lr / "a.png"))]
    assert not torch.equal(lrs[0], lrs[1]) and not torch.equal(lrs[1], lrs[2])  # each seed its own LR
    g = torch.Generator().manual_seed(zlib.crc32(b"a"))
    assert torch.equal(lrs[0], degrade(load_image(str(hr["a"]))[None], 4, PRESETS["realesrgan"], g)[0][0])


def test_cli_writes_make_lr_files(tmp_path):
    sizes = {"a.png": (48, 64), "b.jpg": (40, 40), "c.bmp": (37, 53)}
    hr = tmp_path / "hr"
    hr.mkdir()
    for i, (name, (h, w)) in enumerate(sizes.items()):
        Image.fromarray(np.uint8(photo(1, h, w, seed=i)[0].permute(1, 2, 0).numpy() * 255)).save(hr / name)
    (hr / "notes.txt").write_text("not an image")
    subprocess.run([sys.executable, str(ROOT / "degrade.py"), "--hr", str(hr), "--out", str(tmp_path / "lr"), "--seed",
                    "3", "--preset", "seesr", "--device", "cpu"], check=True, capture_output=True)
    assert sorted(p.name for p in (tmp_path / "lr").iterdir()) == ["a.png", "b.png", "c.png"]
    for name, (h, w) in sizes.items():
        im = Image.open(tmp_path / "lr" / (Path(name).stem + ".png"))
        assert im.size == (w // 4, h // 4) and im.mode == "RGB"
    make_lr([str(hr / n) for n in sizes], str(tmp_path / "ref"), seed=3, opts=PRESETS["seesr"])
    for name in sizes:
        png = Path(name).stem + ".png"
        assert (tmp_path / "lr" / png).read_bytes() == (tmp_path / "ref" / png).read_bytes()
