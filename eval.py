"""
Paper-style evaluation: run a method over a benchmark, score its outputs with the metrics of
StrSR, FluxSR, SMFSR and TEASR, and write one table row per (method, dataset).

  python eval.py --method bicubic --bench sample                      # offline, out of the box
  python eval.py --method bicubic,strsr --ckpt out/strsr --bench RealSR,DRealSR [--steps K] [--seed S]
  python eval.py --sr out/eval/strsr/RealSR --hr data/RealSR/HR        # score existing outputs

Benchmarks, under --data_root (default data/); LR and HR files pair by file stem, a trailing
_LR/_LR4/_HR/_SR/_x4 tag ignored (RealSR ships Canon_001_LR4.png with Canon_001_HR.png):
  DIV2K-val/HR/           LR made once with degrade.py (Real-ESRGAN) from each HR cropped to a multiple of
                          4, seeded from (--degrade_seed, file stem) exactly as `degrade.py --seed`, cached
                          in DIV2K-val/LR_seed{S}/; the reference is that HR, not its USM-sharpened copy.
                          --degrade bicubic: the classical bicubic x4 LR instead, in LR_bicubic_seed{S}/.
                          A released LR set in DIV2K-val/LR/ is used instead when present.
  RealSR/LR/, RealSR/HR/  DRealSR/LR/, DRealSR/HR/
  RealLQ250/LR/, RealSet65/LR/   no HR: no-reference metrics only
  sample                  the held-out scikit-image photo(s) (common.SAMPLE_HELDOUT), made like DIV2K-val

Metrics (pyiqa), in the papers' column order. PSNR and SSIM on the Y channel of YCbCr, BT.601 as
MATLAB's rgb2ycbcr (Y = 16 + 65.481 R + 128.553 G + 24.966 B, RGB in [0, 1]): pyiqa's `psnr`/`ssim`
with test_y_channel=True, color_space="ycbcr", as in OSEDiff's evaluation that TEASR follows (pyiqa's
default color space is YIQ, a different Y). SSIM: 11x11 Gaussian window, sigma 1.5, on 8-bit Y.
LPIPS (AlexNet), DISTS, FID (folder SR vs folder HR); NIQE, MUSIQ, MANIQA (PIPAL), CLIPIQA, TOPIQ
(topiq_nr), Q-Align; LPIPS-rand (ours): VGG LPIPS with the lpips package's linear heads on a random
VGG backbone drawn from seed 0, which needs no download. It is a fixed perceptual distance of sorts for
offline runs, not comparable with the papers' LPIPS, and the loss of offline mini/tiny training uses the
same network, so it measures what was optimised (PSNR is the independent check). A metric whose weights or packages cannot load is reported n/a with its reason,
never as a number; a mean is reported only when every image of the set was scored.

Outputs go to --out_dir/<name>/<bench>/<stem>.png (not regenerated when present); per-image scores
and timings are appended to scores.jsonl next to them, so an interrupted run resumes. The table is
merged into --out_dir/results.{md,csv,json}. s/img times the sampler call alone; peak memory is
CUDA max allocated (GPU) or the process's peak RSS (CPU).
"""
import argparse, contextlib, csv, glob, hashlib, importlib, io, json, math, os, re, socket, sys, time, warnings, zlib

import torch

import common
from degrade import check_preset

# --------------------------------------------------------------------------- metrics
# column, pyiqa name, options, kind (fr: per image with HR, nr: per image, fid: per folder), higher is better
METRICS = [
    ("PSNR", "psnr", dict(test_y_channel=True, color_space="ycbcr"), "fr", True),  # Y of YCbCr (all four papers)
    ("SSIM", "ssim", dict(test_y_channel=True, color_space="ycbcr"), "fr", True),
    ("LPIPS", "lpips", {}, "fr", False),  # AlexNet v0.1, pyiqa's default, as OSEDiff's script
    ("DISTS", "dists", {}, "fr", False),
    ("FID", "fid", {}, "fid", False),
    ("NIQE", "niqe", {}, "nr", False),
    ("MUSIQ", "musiq", {}, "nr", True),
    ("MANIQA", "maniqa-pipal", {}, "nr", True),  # the PIPAL-trained head, as OSEDiff's script
    ("CLIPIQA", "clipiqa", {}, "nr", True),
    ("TOPIQ", "topiq_nr", {}, "nr", True),
    ("Q-Align", "qalign", {}, "nr", True),
    ("LPIPS-rand", None, {}, "fr", False),  # ours: VGG LPIPS with a fixed random backbone (offline stand-in)
]
COLS = [m[0] for m in METRICS]
KIND = {m[0]: m[3] for m in METRICS}
FMT = {"PSNR": ".2f", "FID": ".2f", "MUSIQ": ".2f", "s/img": ".3f", "mem_GB": ".2f"}

def _reason(e):
    offline = any(k in type(e).__name__ for k in ("URLError", "LocalEntry", "Connection", "Timeout"))
    return ("weights not downloadable (offline?): " if offline else "") + f"{type(e).__name__}: " + \
        (str(e).strip().splitlines() or [""])[0][:120]

def _online():
    """One 3 s probe of the hub (or the mirror in HF_ENDPOINT): offline, every metric's download would
    otherwise retry for minutes before failing."""
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host, _, port = re.sub(r"^\w+://", "", url).split("/")[0].partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=3).close()
        return True
    except OSError:
        return False

class Scorer:
    """pyiqa metrics created on first use. A metric that fails to load, or to score an image, is
    unavailable for the rest of the run: `unavailable[col]` holds the one-line reason."""

    def __init__(self, cols, device):
        self.cols, self.device, self.models, self.unavailable = cols, device, {}, {}

    def _fail(self, col, e):
        self.unavailable[col] = _reason(e)
        print(f"{col} unavailable: {self.unavailable[col]}")

    def get(self, col):
        if col in self.unavailable or col in self.models:
            return self.models.get(col)
        if "HF_HUB_OFFLINE" not in os.environ and not _online():
            os.environ["HF_HUB_OFFLINE"] = "1"  # the hub answers from its local cache at once, no retries
            if "huggingface_hub" in sys.modules:  # already imported (by a method): it read the variable then
                sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
        name, opts = next((m[1], m[2]) for m in METRICS if m[0] == col)
        if name is None:  # LPIPS-rand: the lpips package's heads on a seed-0 random VGG, no download
            with contextlib.redirect_stdout(io.StringIO()):
                self.models[col] = common.load_lpips(self.device, "random")
            return self.models[col]
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # torch.hub downloads have no timeout of their own
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                import pyiqa
                self.models[col] = pyiqa.create_metric(name, device=self.device, **opts).eval()
        except Exception as e:
            self._fail(col, e)
        finally:
            socket.setdefaulttimeout(old)
        return self.models.get(col)

    def compute(self, col, *inputs):
        """x_sr (1, 3, H, W) in [0, 1] (and x_hr for a full-reference metric), or (sr_dir, hr_dir)
        for FID. A float, or None when the metric is unavailable."""
        m = self.get(col)
        if m is None:
            return None
        try:
            with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                if col == "FID":
                    v = m(*inputs, num_workers=0, verbose=False)
                else:
                    v = m(*(x.to(self.device) for x in inputs))
            v = float(v.mean() if torch.is_tensor(v) else v)
            if not math.isfinite(v):
                raise ValueError(f"non-finite value {v}")
            return v
        except Exception as e:
            self._fail(col, e)


# --------------------------------------------------------------------------- benchmarks
BENCHES = {"DIV2K-val": "synthetic", "RealSR": "paired", "DRealSR": "paired", "RealLQ250": "lr", "RealSet65": "lr",
           "sample": "synthetic"}
_TAG = re.compile(r"(?:[_-](?:hr|lr\d*|sr|x\d)|(?<=\d)x\d)$", re.IGNORECASE)  # Canon_001_LR4, 0801x4

def stem_key(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    return _TAG.sub("", stem) or stem

def _by_key(files):
    m = {}
    for f in files:
        if (k := stem_key(f)) in m:
            raise SystemExit(f"two files with the same stem {k!r}: {m[k]} and {f}")
        m[k] = f
    return m

def pair_by_stem(a_files, b_files):
    """(pairs [(key, a, b)], keys only in a, keys only in b), pairing by stem_key."""
    a, b = _by_key(a_files), _by_key(b_files)
    return [(k, a[k], b[k]) for k in sorted(a) if k in b], sorted(set(a) - set(b)), sorted(set(b) - set(a))

def _images(folder):  # [] for a missing or empty folder (list_images exits on those)
    return sorted(f for f in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if f.lower().endswith(common.IMG_EXTS))

def _layout_error(bench, root, what):
    lay = {"paired": f"{root}/LR/*.png and {root}/HR/*.png (same file stems)", "lr": f"{root}/LR/*.png",
           "synthetic": f"{root}/HR/*.png (LR made with degrade.py) or {root}/LR + {root}/HR"}[BENCHES[bench]]
    return SystemExit(f"benchmark {bench}: {what}. Expected {lay}; see the README, Benchmarks.")

def report_unpaired(what_a, only_a, what_b, only_b):
    for what, keys in ((what_a, only_a), (what_b, only_b)):
        if keys:
            print(f"unpaired: {len(keys)} {what}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}")

def make_lr(hr_files, lr_dir, seed, preset="realesrgan"):
    """LR of each HR (cropped to a multiple of 4) by the degrade.PRESETS `preset`, seeded as `degrade.py
    --seed` does: from (seed, file stem), so an image's LR depends neither on the other files nor on the device."""
    try:
        from degrade import degrade, PRESETS
    except ImportError as e:
        raise SystemExit(f"DIV2K-val needs degrade.py to make its LR images ({e})")
    for f in hr_files:
        stem = os.path.splitext(os.path.basename(f))[0]
        out = os.path.join(lr_dir, stem + ".png")
        if os.path.exists(out):
            continue
        x_hr = common.load_image(f)
        x_hr = x_hr[:, : x_hr.shape[1] // 4 * 4, : x_hr.shape[2] // 4 * 4]  # (3, H, W), H and W multiples of 4
        g = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(stem.encode()))
        x_lr, _ = degrade(x_hr[None], scale=4, opts=PRESETS[preset], generator=g)  # (1, 3, H/4, W/4)
        tmp = os.path.join(lr_dir, f".{stem}.png")  # hidden until complete: list_images skips it
        common.save_image(x_lr, tmp)
        os.replace(tmp, out)

def load_bench(bench, data_root, degrade_seed=0, limit=0, degrade="realesrgan"):
    """[(key, lr_path, hr_path or None)] of a benchmark (the first `limit`), and its HR folder (or None)."""
    if bench not in BENCHES:
        raise SystemExit(f"unknown --bench {bench!r}; choose from {', '.join(BENCHES)}")
    root = os.path.join(data_root, bench)
    if bench == "sample":  # the held-out photos as an HR folder, so it runs like DIV2K-val
        os.makedirs(os.path.join(root, "HR"), exist_ok=True)
        for name, x in zip(common.SAMPLE_HELDOUT, common.sample_photos(common.SAMPLE_HELDOUT)):
            if not os.path.exists(os.path.join(root, "HR", name + ".png")):
                common.save_image(x, os.path.join(root, "HR", name + ".png"))
    if not os.path.isdir(root):
        raise _layout_error(bench, root, f"folder {root} not found")
    hr_dir, lr_dir = os.path.join(root, "HR"), os.path.join(root, "LR")
    hr, lr = _images(hr_dir), _images(lr_dir)
    kind = BENCHES[bench]
    if kind == "synthetic" and not lr:
        if not hr:
            raise _layout_error(bench, root, f"no images in {hr_dir}")
        lr_dir = os.path.join(root, f"LR_seed{degrade_seed}" if degrade == "realesrgan" else f"LR_{degrade}_seed{degrade_seed}")
        os.makedirs(lr_dir, exist_ok=True)
        make_lr(hr[: limit or None], lr_dir, degrade_seed, degrade)
        lr = _images(lr_dir)
    if not lr:
        raise _layout_error(bench, root, f"no images in {lr_dir}")
    if kind == "lr":
        return [(stem_key(f), f, None) for f in lr][: limit or None], None
    if not hr:
        raise _layout_error(bench, root, f"no images in {hr_dir}")
    pairs, only_lr, only_hr = pair_by_stem(lr, hr)
    report_unpaired("LR without HR", only_lr, "HR without LR", only_hr)
    if not pairs:
        raise _layout_error(bench, root, "no LR/HR pair with the same file stem")
    return pairs[: limit or None], hr_dir


# --------------------------------------------------------------------------- running a method
def build_fn(method, ckpt, device, steps, seed, samplers=None):
    """The SR function of a method: bicubic, or a method script's build_sampler on the checkpoint `ckpt`."""
    if method == "bicubic":
        return common.upsample_lr
    if not ckpt:
        raise SystemExit(f"--method {method} needs --ckpt (a checkpoint or training output folder)")
    if method in (samplers or {}):  # the running script's own (a second import would load it twice)
        build = samplers[method]
        mod = sys.modules[build.__module__]
    else:
        try:
            mod = importlib.import_module(method)
            build = mod.build_sampler
        except (ImportError, AttributeError) as e:
            raise SystemExit(f"--method {method}: no build_sampler in {method}.py ({e}); choose bicubic, strsr, "
                             f"fluxsr, smfsr or teasr")
    return build(mod.Config(ckpt=ckpt, steps=steps, seed=seed), str(device))

def _append(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")

def _read_cache(path):  # records are flat: a line cut by an interruption does not end in "}"
    with open(path) if os.path.exists(path) else io.StringIO() as f:
        return [json.loads(l) for l in f if l.rstrip().endswith("}")]

def write_outputs(items, run_dir, make_fn, device, run_info):
    """Write <key>.png for each LR not already done by the same run (method, ckpt, steps, seed)."""
    info_file, cache = os.path.join(run_dir, "run.json"), os.path.join(run_dir, "scores.jsonl")
    os.makedirs(run_dir, exist_ok=True)
    old = json.load(open(info_file)) if os.path.exists(info_file) else run_info
    if old != run_info:
        print(f"{run_dir}: outputs of another run ({old}): regenerating")
        for f in _images(run_dir) + [cache] * os.path.exists(cache):
            os.remove(f)
    json.dump(run_info, open(info_file, "w"))
    todo = [(k, lr) for k, lr, _ in items if not os.path.exists(os.path.join(run_dir, k + ".png"))]
    if not todo:
        return
    fn, cuda = make_fn(), device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda d: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    from tqdm import tqdm
    for k, lr in tqdm(todo, desc=f"sr {os.path.basename(run_dir)}", disable=len(todo) < 2):
        x_lr = common.load_image(lr)[None]  # (1, 3, h, w), on the CPU as common.sample_files passes it
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            x_sr = fn(x_lr)  # (1, 3, 4h, 4w)
        sync(device)
        sec = time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else common.peak_rss_gb()
        tmp = os.path.join(run_dir, f".{k}.png")
        common.save_image(x_sr, tmp)
        os.replace(tmp, os.path.join(run_dir, k + ".png"))
        _append(cache, {"image": k, "set": "gen", "sec": sec, "mem_GB": mem})


# --------------------------------------------------------------------------- scoring
def _hash(*paths):  # of the files' bytes: a changed output or HR is scored again
    h = hashlib.sha1()
    for p in filter(None, paths):
        h.update(open(p, "rb").read())
    return h.hexdigest()[:16]

def _match(x_sr, x_hr, key):
    """HR cropped to the SR size when it is larger by less than the scale (HR not a multiple of 4)."""
    (h, w), (H, W) = x_sr.shape[-2:], x_hr.shape[-2:]
    if (h, w) != (H, W):
        if not (0 <= H - h < 4 and 0 <= W - w < 4):
            raise SystemExit(f"{key}: output {w}x{h} vs HR {W}x{H}: not a x4 output of this HR")
        x_hr = x_hr[..., :h, :w]
    return x_hr

def score(pairs, run_dir, scorer, sr_dir, hr_dir):
    """Mean of each metric over `pairs` [(key, sr_path, hr_path or None)], reusing and extending
    run_dir/scores.jsonl (one line per image per metric set)."""
    cache = os.path.join(run_dir, "scores.jsonl")
    os.makedirs(run_dir, exist_ok=True)
    done, gen = {}, {}
    for r in _read_cache(cache):
        if r.get("set") == "gen":
            gen[r["image"]] = r
        else:
            done.setdefault((r["image"], r.get("key")), {}).update({c: r[c] for c in COLS if c in r})
    has_hr = all(hr for _, _, hr in pairs)
    per_image = [c for c in scorer.cols if KIND[c] == "nr" or (KIND[c] == "fr" and has_hr)]
    values = {c: [] for c in per_image}
    from tqdm import tqdm
    for k, sr, hr in tqdm(pairs, desc="score", disable=len(pairs) < 2):
        key = _hash(sr, hr)
        have = done.setdefault((k, key), {})
        todo = [c for c in per_image if c not in have and c not in scorer.unavailable]
        if todo:
            x_sr = common.load_image(sr)[None]  # (1, 3, H, W)
            x_hr = _match(x_sr, common.load_image(hr)[None], k) if hr else None
        for kind in ("fr", "nr"):  # one cache line per image per metric set
            new = {}
            for c in (c for c in todo if KIND[c] == kind):
                v = scorer.compute(c, x_sr, x_hr) if kind == "fr" else scorer.compute(c, x_sr)
                if v is not None:
                    new[c] = v
            if new:
                _append(cache, {"image": k, "key": key, "set": kind, **new})
                have.update(new)
        for c in per_image:
            values[c].append(have.get(c))
    row = {c: None if None in v else sum(v) / len(v) for c, v in values.items()}  # a mean of every image or none
    if "FID" in scorer.cols and has_hr and hr_dir:
        fkey = _hash(*[p for pair in pairs for p in pair[1:]])
        hit = done.get(("*", fkey), {}).get("FID")
        row["FID"] = hit if hit is not None else scorer.compute("FID", sr_dir, hr_dir)
        if row["FID"] is not None and hit is None:
            _append(cache, {"image": "*", "key": fkey, "set": "fid", "FID": row["FID"]})
    timed = [gen[k] for k, _, _ in pairs if k in gen]  # none when scoring outputs made elsewhere: "-"
    if timed:
        row["s/img"], row["mem_GB"] = sum(r["sec"] for r in timed) / len(timed), max(r["mem_GB"] for r in timed)
    applicable = [c for c in scorer.cols if c in row]
    row["unavailable"] = {c: scorer.unavailable.get(c, "not computed for every image") for c in applicable if row[c] is None}
    return row


# --------------------------------------------------------------------------- table
def _cell(row, c):  # "-": not applicable (no HR) or not requested
    return "-" if c not in row else "n/a" if row[c] is None else format(row[c], FMT.get(c, ".4f"))

def write_tables(rows, out_dir):
    """Merge rows into out_dir/results.json by (method, dataset); rewrite results.md/.csv; return the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    old = json.load(open(path)) if os.path.exists(path) else []
    new = {(r["method"], r["dataset"]) for r in rows}
    rows = [r for r in old if (r["method"], r["dataset"]) not in new] + rows
    cols = [c for c in COLS if any(c in r for r in rows)] + ["s/img", "mem_GB"]  # metrics never requested: no column
    arrow = {m[0]: " ↑" if m[4] else " ↓" for m in METRICS}
    lines = ["| Method | Dataset | N | " + " | ".join(c + arrow.get(c, "") for c in cols) + " |",
             "|" + "---|" * (len(cols) + 3)]
    notes = {}
    for r in rows:
        lines.append(f"| {r['method']} | {r['dataset']} | {r['n']} | " + " | ".join(_cell(r, c) for c in cols) + " |")
        for c, why in r.get("unavailable", {}).items():
            notes.setdefault(f"{c}: {why}", None)
    md = "\n".join(lines) + "\n"
    if notes:
        md += "\nn/a = unavailable, never estimated; - = not applicable (no HR) or not requested.\n" + "".join(f"- {n}\n" for n in notes)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "dataset", "n"] + cols)
        for r in rows:
            w.writerow([r["method"], r["dataset"], r["n"]] + ["" if r.get(c) is None else r[c] for c in cols])
    json.dump(rows, open(path, "w"), indent=1)
    return md

def run_method(a, method, scorer, device, samplers=None):
    """One row per benchmark for `method` (outputs cached, see the module docstring)."""
    name, rows, built = a.name or (method + (f"-{a.steps}step" if a.steps > 1 else "")), [], {}
    ckpt_arg = "" if method == "bicubic" else a.ckpt

    def make_fn():  # on first need: a resumed run with all outputs on disk loads no model
        if "fn" not in built:
            built["fn"] = build_fn(method, ckpt_arg, device, a.steps, a.seed, samplers)
        return built["fn"]

    for bench in [b.strip() for b in a.bench.split(",") if b.strip()]:
        items, hr_dir = load_bench(bench, a.data_root, a.degrade_seed, a.limit, a.degrade)
        run_dir = os.path.join(a.out_dir, name, bench)
        ckpt = os.path.abspath(common.latest_checkpoint(ckpt_arg) or ckpt_arg) if ckpt_arg else ""  # a newer ckpt-* is another run
        info = {"method": method, "ckpt": ckpt, "steps": a.steps, "seed": a.seed,
                "lr": os.path.abspath(os.path.dirname(items[0][1]))}
        write_outputs(items, run_dir, make_fn, device, info)
        pairs = [(k, os.path.join(run_dir, k + ".png"), hr) for k, _, hr in items]
        rows.append({"method": name, "dataset": bench, "n": len(items), **score(pairs, run_dir, scorer, run_dir, hr_dir)})
    return rows


# --------------------------------------------------------------------------- main
def prefetch():
    """`python common.py prefetch`: every metric's weights into pyiqa's cache, each said; the failures."""
    scorer = Scorer([c for c in COLS if c != "LPIPS-rand"], torch.device("cpu"))
    for col in scorer.cols:
        with contextlib.redirect_stdout(io.StringIO()):  # its reason is in the summary
            ready = scorer.get(col) is not None
        print(f"{col}: " + ("ready" if ready else "failed"))
    return [f"{col}: {why}" for col, why in scorer.unavailable.items()]

def heldout(method, build_sampler, out_dir, degrade="realesrgan"):
    """The end of a mini run: this table on the held-out sample photo, its LR made by the degradation the run trained
    on; bicubic and the method (`build_sampler`: the caller's own, so a running script is not imported again)."""
    return main(["--method", f"bicubic,{method}", "--ckpt", out_dir, "--bench", "sample", "--degrade", degrade,
                 "--out_dir", os.path.join(out_dir, "eval"), "--metrics", "PSNR,SSIM,LPIPS,LPIPS-rand"],
                {method: build_sampler})

def main(argv=None, samplers=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--method", default="", help="comma-separated: bicubic, strsr, fluxsr, smfsr, teasr (modules with build_sampler)")
    p.add_argument("--ckpt", default="", help="checkpoint folder, or a training out_dir (latest ckpt-*)")
    p.add_argument("--bench", default="sample", help=f"comma-separated: {', '.join(BENCHES)}")
    p.add_argument("--data_root", default="data")
    p.add_argument("--out_dir", default="out/eval")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--degrade_seed", type=int, default=0, help="seed of the DIV2K-val / sample LR images")
    p.add_argument("--degrade", default="realesrgan", help="degrade.PRESETS name that makes those LR images (mini runs: bicubic)")
    p.add_argument("--sr", default="", help="score this folder of outputs instead of running a method")
    p.add_argument("--hr", default="", help="HR folder for --sr (omit: no-reference metrics only)")
    p.add_argument("--name", default="", help="row label (default: method, -Kstep appended when K > 1)")
    p.add_argument("--metrics", default=",".join(COLS), help="comma-separated subset of " + ",".join(COLS))
    p.add_argument("--limit", type=int, default=0, help="first N images only (quick checks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    check_preset(a.degrade)
    cols = [c.strip() for c in a.metrics.split(",") if c.strip()]
    if bad := [c for c in cols if c not in COLS]:
        raise SystemExit(f"--metrics: unknown {bad}; choose from {', '.join(COLS)}")
    device, rows = torch.device(a.device), []
    scorer = Scorer([c for c in COLS if c in cols], device)
    if a.sr:  # outputs on disk: paired with --hr by stem, or no-reference only
        if not os.path.isdir(a.sr) or (a.hr and not os.path.isdir(a.hr)):
            raise SystemExit(f"--sr {a.sr!r} / --hr {a.hr!r}: expected folders of images")
        pairs, only_sr, only_hr = pair_by_stem(_images(a.sr), _images(a.hr) if a.hr else [])
        pairs = (pairs if a.hr else [(k, f, None) for k, f in _by_key(_images(a.sr)).items()])[: a.limit or None]
        report_unpaired("SR without HR", only_sr if a.hr else [], "HR without SR", only_hr)
        if not pairs:
            raise SystemExit(f"--sr {a.sr}: no images{' paired by stem with --hr ' + a.hr if a.hr else ''}")
        hr, sr = os.path.normpath(a.hr or "custom"), os.path.normpath(a.sr)
        dataset = os.path.basename(os.path.dirname(hr) if os.path.basename(hr) == "HR" else hr)  # data/RealSR/HR -> RealSR
        name = a.name or os.path.basename(os.path.dirname(sr) if os.path.basename(sr) == dataset else sr)  # out/eval/M/RealSR -> M
        row = score(pairs, os.path.join(a.out_dir, "scored", name, dataset), scorer, a.sr, a.hr or None)
        rows.append({"method": name, "dataset": dataset, "n": len(pairs), **row})
    else:
        methods = [m.strip() for m in a.method.split(",") if m.strip()]
        if not methods:
            raise SystemExit("give --method (bicubic, strsr, fluxsr, smfsr, teasr) or --sr DIR [--hr DIR]")
        if a.name and len(methods) > 1:
            raise SystemExit("--name labels one method's row; give one --method with it")
        for method in methods:  # --ckpt is for the learned methods (bicubic has none)
            rows += run_method(a, method, scorer, device, samplers)
    print(write_tables(rows, a.out_dir), end="")
    print(f"written: {os.path.join(a.out_dir, 'results.md')} (.csv, .json)")
    return rows

if __name__ == "__main__":
    main()
