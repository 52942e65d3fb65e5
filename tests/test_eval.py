"""eval.py: Y-channel PSNR/SSIM against numpy, blockiness, pairing, unavailable metrics, end-to-end runs, resume,
the held-out table and compare.png of a mini run."""
import json, os, sys, types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import common as C
import eval as E

@pytest.fixture(scope="module")
def photo():
    return C.sample_photos(["astronaut"])[0]  # (3, 512, 512)


def crops(photo, n, size):
    return [photo[:, 40 + 90 * i: 40 + 90 * i + size, 60 + 70 * i: 60 + 70 * i + size].clone() for i in range(n)]


def q8(x):  # what an 8-bit PNG holds
    return (x * 255).round() / 255


def make_paired(root, photo, n=2, hr=64):
    """RealSR layout: LR/<k>_LR4.png (bicubic /4 of the HR) and HR/<k>_HR.png."""
    for i, x in enumerate(crops(photo, n, hr)):
        x_lr = F.interpolate(x[None], scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)
        C.save_image(x_lr, os.path.join(root, "LR", f"img{i}_LR4.png"))
        C.save_image(x, os.path.join(root, "HR", f"img{i}_HR.png"))


# --------------------------------------------------------------------------- independent references
def y_bt601(x):
    """MATLAB rgb2ycbcr luma of (3, H, W) in [0, 1]: 16..235 (ITU-R BT.601)."""
    r, g, b = x.double().numpy()
    return 16 + 65.481 * r + 128.553 * g + 24.966 * b


def psnr_np(a, b):
    return 10 * np.log10(255**2 / np.mean((y_bt601(a) - y_bt601(b)) ** 2))


def ssim_np(a, b):
    """Wang et al. 2004 on the 8-bit Y: 11x11 Gaussian window (sigma 1.5), valid region only."""
    x, y = np.round(y_bt601(a)), np.round(y_bt601(b))
    t = np.arange(-5, 6)
    w = np.exp(-(t[:, None] ** 2 + t[None] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    f = lambda z: ndimage.correlate(z, w, mode="constant")[5:-5, 5:-5]
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))


# --------------------------------------------------------------------------- metrics
def test_y_channel_is_bt601(photo):
    """The Y eval.py asks pyiqa for is BT.601 YCbCr (MATLAB rgb2ycbcr), not pyiqa's default YIQ."""
    from pyiqa.utils.color_util import to_y_channel
    x = photo[:, :32, :48]
    space = dict((m[0], m[2]) for m in E.METRICS)["PSNR"]["color_space"]
    y = to_y_channel(x[None].double(), 255.0, space)[0, 0].numpy()
    assert np.abs(y - y_bt601(x)).max() <= 0.5 + 1e-6  # 8-bit rounding of Y
    black_white = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2).double()
    assert to_y_channel(black_white, 255.0, space).flatten().tolist() == [16.0, 235.0]  # studio range


def test_psnr_ssim_match_numpy(photo):
    g = torch.Generator().manual_seed(0)
    sc = E.Scorer(["PSNR", "SSIM"], torch.device("cpu"))
    for a in crops(photo, 3, 96):
        blur = F.avg_pool2d(a[None], 3, 1, 1, count_include_pad=False)[0]
        colour = torch.tensor([0.03, -0.02, 0.01]).view(3, 1, 1)
        b = q8((blur + colour + 0.02 * torch.randn(a.shape, generator=g)).clamp(0, 1))
        psnr, ssim = sc.compute("PSNR", b[None], a[None]), sc.compute("SSIM", b[None], a[None])
        assert psnr == pytest.approx(psnr_np(b, a), abs=2e-3)
        assert ssim == pytest.approx(ssim_np(b, a), abs=2e-4)
        assert 15 < psnr < 40 and 0.3 < ssim < 0.99
    assert sc.compute("SSIM", a[None], a[None]) == pytest.approx(1.0, abs=1e-9)
    assert not sc.unavailable


def test_blockiness(photo):
    """1 on a smooth image, clearly above with every other 8x8 block offset; the held-out photo's HR and the bicubic
    upsampling of its classical LR (the issue's reference values)."""
    from degrade import PRESETS, degrade
    rng = np.random.default_rng(0)
    smooth = ndimage.gaussian_filter(rng.random((3, 256, 256)), (0, 3, 3))
    smooth = torch.from_numpy((smooth - smooth.min()) / (smooth.max() - smooth.min()))[None]  # (1, 3, 256, 256)
    checker = (torch.arange(256) // 8 % 2)[:, None] ^ (torch.arange(256) // 8 % 2)[None]  # every other 8x8 block
    blocky = (0.8 * smooth + 0.1 * checker).clamp(0, 1)
    assert float(E.blockiness(smooth)) == pytest.approx(1, abs=0.03)
    assert float(E.blockiness(blocky)) > 2
    assert float(E.blockiness(photo[None])) == pytest.approx(1.026, abs=0.01)
    x_lr, _ = degrade(photo[None], 4, PRESETS["bicubic"], torch.Generator().manual_seed(0))
    assert float(E.blockiness(C.upsample_lr(x_lr))) == pytest.approx(0.960, abs=0.01)


def test_crop_border_scores_psnr_ssim_on_the_inner_image(photo):
    """--crop_border 4, as BasicSR: PSNR and SSIM of the images less 4 px at each border (numpy on the crops), so an
    error confined to the border changes nothing; without it the same error costs dB."""
    a = crops(photo, 1, 96)[0]
    b = q8((a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1))
    bad = b.clone()
    bad[:, :4], bad[:, :, -4:] = 1 - bad[:, :4], 0.0  # the top rows inverted, the right columns black
    sc = E.Scorer(["PSNR", "SSIM"], torch.device("cpu"), crop_border=4)
    inner = (slice(None), slice(4, -4), slice(4, -4))
    assert sc.compute("PSNR", bad[None], a[None]) == pytest.approx(psnr_np(b[inner], a[inner]), abs=2e-3)
    assert sc.compute("SSIM", bad[None], a[None]) == pytest.approx(ssim_np(b[inner], a[inner]), abs=2e-4)
    assert E.Scorer(["PSNR"], torch.device("cpu")).compute("PSNR", bad[None], a[None]) < psnr_np(b, a) - 5


def test_stablesr_protocol_reads_the_crops_and_labels_its_rows(tmp_path, photo, monkeypatch):
    """--protocol stablesr scores data_root/StableSR/RealSR (the 512 px crops), a row apart from the full-size set's;
    QualiCLIP (pyiqa's qualiclip) offline is n/a with the download reason, as the other downloaded metrics."""
    import pyiqa, urllib.error
    real = pyiqa.create_metric

    def offline(name, **kw):
        if name == "qualiclip":
            raise urllib.error.URLError("qualiclip weights: Name or service not known")
        return real(name, **kw)
    monkeypatch.setattr(pyiqa, "create_metric", offline)
    make_paired(str(tmp_path / "StableSR" / "RealSR"), photo, n=1, hr=128)
    make_paired(str(tmp_path / "RealSR"), photo[:, 200:], n=1, hr=64)
    argv = ["--method", "bicubic", "--bench", "RealSR", "--data_root", str(tmp_path), "--out_dir", str(tmp_path / "o"),
            "--metrics", "PSNR,QualiCLIP"]
    crop, full = E.main(argv + ["--protocol", "stablesr", "--crop_border", "4"])[0], E.main(argv)[0]
    assert (crop["dataset"], full["dataset"]) == ("RealSR-stablesr-crop4", "RealSR")
    x_lr, x_hr = (C.load_image(str(tmp_path / "StableSR" / "RealSR" / d / f)) for d, f in (("LR", "img0_LR4.png"),
                                                                                         ("HR", "img0_HR.png")))
    inner = (slice(None), slice(4, -4), slice(4, -4))
    assert crop["PSNR"] == pytest.approx(psnr_np(q8(C.upsample_lr(x_lr[None]))[0][inner], x_hr[inner]), abs=2e-3)
    assert crop["QualiCLIP"] is None and "weights not downloadable" in crop["unavailable"]["QualiCLIP"]
    assert {r["dataset"] for r in json.load(open(tmp_path / "o" / "results.json"))} == {crop["dataset"], "RealSR"}
    with pytest.raises(SystemExit, match="StableSR's test crops are of RealSR and DRealSR, not DIV2K-val"):
        E.load_bench("DIV2K-val", str(tmp_path), protocol="stablesr")
    with pytest.raises(SystemExit, match="StableSR/DRealSR/LR"):
        E.load_bench("DRealSR", str(tmp_path), protocol="stablesr")


def test_pair_by_stem_reports_missing(tmp_path, photo, capsys):
    names = {"sr": ["Canon_001_LR4.png", "Canon_002_LR4.png", "x.png"],
             "hr": ["Canon_001_HR.png", "Canon_003_HR.png", "x.png"]}
    for d, files in names.items():
        for f in files:
            C.save_image(photo[:, :16, :16], str(tmp_path / d / f))
    pairs, only_sr, only_hr = E.pair_by_stem(C.list_images(str(tmp_path / "sr")), C.list_images(str(tmp_path / "hr")))
    assert [p[0] for p in pairs] == ["Canon_001", "x"] and only_sr == ["Canon_002"] and only_hr == ["Canon_003"]
    assert pairs[0][1].endswith("Canon_001_LR4.png") and pairs[0][2].endswith("Canon_001_HR.png")
    rows = E.main(["--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"), "--metrics", "PSNR",
                   "--out_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "1 SR without HR: Canon_002" in out and "1 HR without SR: Canon_003" in out
    assert rows[0]["n"] == 2 and rows[0]["PSNR"] > 60  # identical pairs: eps-limited PSNR


def test_missing_or_malformed_benchmark(tmp_path):
    with pytest.raises(SystemExit, match=r"RealSR/LR/\*.png and .*RealSR/HR"):
        E.load_bench("RealSR", str(tmp_path))
    os.makedirs(tmp_path / "RealSR" / "LR")
    with pytest.raises(SystemExit, match="no images"):
        E.load_bench("RealSR", str(tmp_path))
    with pytest.raises(SystemExit, match="unknown --bench"):
        E.load_bench("Set5", str(tmp_path))


def test_unavailable_metrics_reported_rest_computed(tmp_path, photo, monkeypatch):
    """A metric that cannot load, or gives a non-number, is n/a with its reason; the others are scored."""
    import pyiqa
    real = pyiqa.create_metric

    class NaNMetric(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([float("nan")])

    def fake(name, **kw):
        if name == "lpips":
            raise OSError("weights lpips_alex.pth not found")
        return NaNMetric() if name == "musiq" else real(name, **kw)

    monkeypatch.setattr(pyiqa, "create_metric", fake)
    make_paired(str(tmp_path / "RealSR"), photo)
    out = str(tmp_path / "out")
    rows = E.main(["--method", "bicubic", "--bench", "RealSR", "--data_root", str(tmp_path), "--out_dir", out,
                   "--metrics", "PSNR,SSIM,LPIPS,MUSIQ"])
    r = rows[0]
    assert r["PSNR"] > 20 and 0 < r["SSIM"] < 1
    assert r["LPIPS"] is None and "lpips_alex.pth not found" in r["unavailable"]["LPIPS"]
    assert r["MUSIQ"] is None and "non-finite" in r["unavailable"]["MUSIQ"]
    assert "DISTS" not in r  # not requested: "-", not n/a
    md = open(os.path.join(out, "results.md")).read()
    line = next(l for l in md.splitlines() if l.startswith("| bicubic | RealSR"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5] == "n/a" and cells[6] == "n/a" and "lpips_alex.pth not found" in md
    assert "DISTS" not in md.splitlines()[0]  # a metric nobody asked for gets no column
    assert json.load(open(os.path.join(out, "results.json")))[0]["LPIPS"] is None
    assert "n/a" not in open(os.path.join(out, "results.csv")).read()  # empty cells, never a number


# --------------------------------------------------------------------------- end to end
def test_bicubic_end_to_end(tmp_path, photo, monkeypatch):
    """eval.py --method bicubic over a generated RealSR folder (value checked against numpy) and a
    DIV2K-val HR folder (LR made once with degrade.py, HR not a multiple of 4)."""
    data, out = tmp_path / "data", str(tmp_path / "out")
    make_paired(str(data / "RealSR"), photo)
    for i, x in enumerate(crops(photo, 2, 66)):  # 0801 66x66 (cropped to 64 first), 0802 64x64
        C.save_image(x[:, : 66 - 2 * i, : 66 - 2 * i], str(data / "DIV2K-val" / "HR" / f"{801 + i:04d}.png"))
    E.main(["--method", "bicubic", "--bench", "RealSR,DIV2K-val", "--data_root", str(data), "--out_dir", out,
            "--metrics", "PSNR,SSIM,NIQE"])
    rows = {row["dataset"]: row for row in json.load(open(os.path.join(out, "results.json")))}
    ref = []
    for i in range(2):
        lr = C.load_image(str(data / "RealSR" / "LR" / f"img{i}_LR4.png"))[None]
        sr = C.load_image(os.path.join(out, "bicubic", "RealSR", f"img{i}.png"))
        assert torch.equal(sr, q8(C.upsample_lr(lr)[0]))
        ref.append(psnr_np(sr, C.load_image(str(data / "RealSR" / "HR" / f"img{i}_HR.png"))))
    assert rows["RealSR"]["PSNR"] == pytest.approx(np.mean(ref), abs=2e-3)
    lr_dir = data / "DIV2K-val" / "LR_seed0"
    assert sorted(os.listdir(lr_dir)) == ["0801.png", "0802.png"]
    assert C.load_image(str(lr_dir / "0801.png")).shape == (3, 16, 16)
    assert C.load_image(os.path.join(out, "bicubic", "DIV2K-val", "0801.png")).shape == (3, 64, 64)
    assert rows["DIV2K-val"]["n"] == 2 and 10 < rows["DIV2K-val"]["PSNR"] < rows["RealSR"]["PSNR"]
    assert rows["RealSR"]["s/img"] > 0 and rows["RealSR"]["mem_GB"] > 0
    assert "| bicubic | DIV2K-val | 2 |" in open(os.path.join(out, "results.md")).read()
    mtime = os.path.getmtime(lr_dir / "0801.png")
    E.main(["--method", "bicubic", "--bench", "DIV2K-val", "--data_root", str(data), "--out_dir", out,
            "--metrics", "PSNR"])
    assert os.path.getmtime(lr_dir / "0801.png") == mtime  # the LR set is made once
    import degrade  # the same LR as the degrade.py command line with the same seed
    monkeypatch.setattr(sys, "argv", ["degrade.py", "--hr", str(data / "DIV2K-val" / "HR"),
                                      "--out", str(tmp_path / "cli"), "--seed", "0", "--device", "cpu"])
    degrade.main()
    assert torch.equal(C.load_image(str(tmp_path / "cli" / "0802.png")), C.load_image(str(lr_dir / "0802.png")))
    # LR-only benchmark: no-reference metrics only, FR columns "-"
    C.save_image(photo[:, :16, :16], str(data / "RealLQ250" / "LR" / "a.png"))
    row = E.main(["--method", "bicubic", "--bench", "RealLQ250", "--data_root", str(data), "--out_dir", out,
                  "--metrics", "PSNR,NIQE"])[0]
    assert "PSNR" not in row and "NIQE" in row


def test_degrade_preset_makes_its_own_lr_set(tmp_path, photo):
    """--degrade bicubic: the sample bench's LR is the bicubic preset's, cached apart from the
    Real-ESRGAN set; an unknown preset is refused before any work."""
    from degrade import PRESETS, degrade
    data, out = tmp_path / "data", str(tmp_path / "out")
    E.main(["--method", "bicubic", "--bench", "sample", "--degrade", "bicubic", "--data_root", str(data),
            "--out_dir", out, "--metrics", "PSNR"])
    hr = C.load_image(str(data / "sample" / "HR" / "astronaut.png"))
    lr = C.load_image(str(data / "sample" / "LR_bicubic_seed0" / "astronaut.png"))
    assert torch.equal(lr, degrade(hr[None], 4, PRESETS["bicubic"])[0][0])
    assert not os.path.exists(data / "sample" / "LR_seed0")
    with pytest.raises(SystemExit, match="--degrade 'blurry'"):
        E.main(["--method", "bicubic", "--degrade", "blurry", "--data_root", str(data), "--out_dir", out])


def test_resume_after_interruption(tmp_path, photo, monkeypatch):
    """Interrupted in generation, then in scoring: nothing done is redone, and the result equals a
    run that was never interrupted. A different seed invalidates the outputs."""
    make_paired(str(tmp_path / "RealSR"), photo, n=3)
    calls = {"sr": 0, "score": 0, "fail_sr": 0, "fail_score": 0}

    def build_sampler(flags, device="cpu"):
        def fn(x_lr):
            calls["sr"] += 1
            if calls["sr"] == calls["fail_sr"]:
                raise KeyboardInterrupt
            return C.upsample_lr(x_lr)
        return fn

    monkeypatch.setitem(sys.modules, "fakesr", types.SimpleNamespace(build_sampler=build_sampler,
                                                                      Config=types.SimpleNamespace))
    compute = E.Scorer.compute

    def counted(self, col, *inputs):
        calls["score"] += 1
        if calls["score"] == calls["fail_score"]:
            raise KeyboardInterrupt
        return compute(self, col, *inputs)

    monkeypatch.setattr(E.Scorer, "compute", counted)
    args = ["--method", "fakesr", "--ckpt", "x", "--bench", "RealSR", "--data_root", str(tmp_path),
            "--metrics", "PSNR,SSIM"]
    run_dir = tmp_path / "out" / "fakesr" / "RealSR"

    def go(fail_sr=0, fail_score=0, out="out", extra=()):
        calls.update(sr=0, score=0, fail_sr=fail_sr, fail_score=fail_score)
        return E.main(args + ["--out_dir", str(tmp_path / out), *extra])

    with pytest.raises(KeyboardInterrupt):
        go(fail_sr=2)  # dies on the 2nd image: only the 1st is on disk
    assert sorted(os.listdir(run_dir)) == ["img0.png", "run.json", "scores.jsonl"]
    with pytest.raises(KeyboardInterrupt):
        go(fail_score=3)  # generates images 2 and 3, scores image 1 (2 metrics), dies on image 2
    assert calls["sr"] == 2
    rows = go()
    assert calls["sr"] == 0 and calls["score"] == 4  # images 2 and 3 only
    fresh = go(out="fresh")
    assert calls["score"] == 6 and rows[0]["PSNR"] == fresh[0]["PSNR"] and rows[0]["SSIM"] == fresh[0]["SSIM"]
    recs = [json.loads(l) for l in open(run_dir / "scores.jsonl")]
    assert sorted(r["image"] for r in recs if r["set"] == "fr") == ["img0", "img1", "img2"]
    assert sorted(r["image"] for r in recs if r["set"] == "gen") == ["img0", "img1", "img2"]
    go(extra=["--seed", "1"])  # another run's outputs are not reused
    assert calls["sr"] == 3 and calls["score"] == 6


def test_heldout_table_and_compare_png(tmp_path, monkeypatch, capsys):
    """The end of a mini run: the table has Blockiness, and compare.png holds the same crops of the LR (nearest),
    the bicubic output, the method's output and the HR, each pixel 2x2, read from the files eval wrote."""
    import pyiqa
    from PIL import Image
    real = pyiqa.create_metric

    def no_lpips(name, **kw):  # pyiqa's LPIPS downloads its weights
        if name == "lpips":
            raise OSError("offline")
        return real(name, **kw)

    def build_sampler(flags, device="cpu"):
        return lambda x_lr: 1 - C.upsample_lr(x_lr)  # unlike every other column

    build_sampler.__module__ = "negsr"
    monkeypatch.setitem(sys.modules, "negsr", types.SimpleNamespace(Config=types.SimpleNamespace))
    monkeypatch.setattr(pyiqa, "create_metric", no_lpips)
    # LPIPS-rand's network (a random VGG16: 4 s per 512 px image) stood in by the mean |SR - HR|, checked below
    monkeypatch.setattr(C, "load_lpips", lambda device, weights: lambda x, y: (x - y).abs().mean())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the data roots under the working directory, as a training run
    rows = E.heldout("negsr", build_sampler, "run", "bicubic", data_root="photos")  # a run's --data_root
    assert [r["method"] for r in rows] == ["bicubic", "negsr"]
    assert 0.9 < rows[0]["Blockiness"] < 1.0 and "Blockiness ↓" in open("run/eval/results.md").read()
    assert "run/compare.png" in capsys.readouterr().out
    hr = C.load_image("photos/sample/HR/astronaut.png")  # each row scored its own output against the HR
    for r in rows:
        sr = C.load_image(f"run/eval/{r['method']}/sample/astronaut.png")
        assert r["LPIPS-rand"] == pytest.approx(float((sr - hr).abs().mean()), abs=2e-3), r["method"]
    sheet = np.asarray(Image.open("run/compare.png").convert("RGB"))
    assert sheet.shape == (16 + 3 * 260 - 4, 4 * 260 - 4, 3)  # three 128 px crops shown 256 px, 4 px apart
    load = lambda f: (C.load_image(f).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H, W, 3)
    columns = [load("photos/sample/LR_bicubic_seed0/astronaut.png").repeat(4, 0).repeat(4, 1),
               load("run/eval/bicubic/sample/astronaut.png"), load("run/eval/negsr/sample/astronaut.png"),
               load("photos/sample/HR/astronaut.png")]
    for j, x in enumerate(columns):
        assert (sheet[:16, 260 * j: 260 * j + 256] < 128).any()  # its label
        for i, (t, l) in enumerate(E.CROPS):
            crop = x[t: t + 128, l: l + 128].repeat(2, 0).repeat(2, 1)
            assert np.array_equal(sheet[16 + 260 * i: 16 + 260 * i + 256, 260 * j: 260 * j + 256], crop)
    first = open("run/compare.png", "rb").read()
    E.heldout("negsr", build_sampler, "run", "bicubic", data_root="photos")
    assert open("run/compare.png", "rb").read() == first  # deterministic
    assert not os.path.exists("data")  # nothing read or written under the default root
