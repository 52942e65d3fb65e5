"""
Paper-style evaluation: run methods over benchmarks, score their outputs with the metrics of
StrSR, FluxSR, SMFSR and TEASR, and merge one row per (method, dataset) into
--out_dir/results.{md,csv,json}.

  python eval.py --method bicubic --bench sample                      # offline, out of the box
  python eval.py --method bicubic,strsr --ckpt out/strsr --bench RealSR,DRealSR [--steps K]
  python eval.py --sr out/eval/strsr/RealSR --hr data/RealSR/HR        # score existing outputs

Benchmarks live under --data_root, LR and HR paired by file stem; an HR folder without LR/ gets
its LR once from degrade.make_lr. A metric that cannot load is n/a with its reason, never a number,
and a mean needs every image scored. Outputs and per-image scores stay in --out_dir/<name>/<bench>/,
so a run resumes.
"""
import argparse, contextlib, csv, dataclasses, functools, glob, hashlib, importlib, io, json, math
import os, re, socket, sys, time, urllib.parse, warnings

import torch
from tqdm import tqdm

import common
from degrade import PRESETS, check_preset, make_lr

# ------------------------------------------------------------ metrics
# Y of YCbCr BT.601 (Y = 16 + 65.481 R + 128.553 G + 24.966 B, RGB in [0, 1]) as the four papers and
# OSEDiff's script; pyiqa's default Y is YIQ's
Y_BT601 = dict(test_y_channel=True, color_space="ycbcr")
METRICS = [  # column, pyiqa name, options, kind, higher is better
    ("PSNR", "psnr", Y_BT601, "fr", True),
    ("SSIM", "ssim", Y_BT601, "fr", True),
    ("LPIPS", "lpips", {}, "fr", False),  # AlexNet v0.1, pyiqa's default, as OSEDiff's script
    ("DISTS", "dists", {}, "fr", False),
    ("FID", "fid", {}, "fid", False),
    ("NIQE", "niqe", {}, "nr", False),
    ("MUSIQ", "musiq", {}, "nr", True),
    ("MANIQA", "maniqa-pipal", {}, "nr", True),  # the PIPAL-trained head, as OSEDiff's script
    ("CLIPIQA", "clipiqa", {}, "nr", True),
    ("TOPIQ", "topiq_nr", {}, "nr", True),
    ("Q-Align", "qalign", {}, "nr", True),
    ("QualiCLIP", "qualiclip", {}, "nr", True),  # StrSR's table
    ("LPIPS-rand", None, {}, "fr", False),  # ours: random-VGG LPIPS, the offline runs' loss
    ("Blockiness", None, {}, "nr", False),  # ours: the 8-px grid a patch decoder or JPEG prints
]
COLS = [m[0] for m in METRICS]
KIND = {m[0]: m[3] for m in METRICS}  # fr: per image with its HR, nr: per image, fid: per folder
FMT = {"PSNR": ".2f", "FID": ".2f", "MUSIQ": ".2f", "s/img": ".3f", "mem_GB": ".2f"}

def step_ratio(x, lines):
    """Mean |luma step| from pixel i to i + 1 for i in lines (columns and rows alike) over the mean
    |step| elsewhere: 1.0 = no edge there. x (B, 3, H, W) in [0, 1] -> (B,)."""
    w = x.new_tensor([65.481, 128.553, 24.966], dtype=torch.float64).view(3, 1, 1)
    y = (x.double() * w / 255).sum(-3)  # BT.601 Y less its offset 16/255, which cancels
    dh, dv = y.diff(dim=-1).abs(), y.diff(dim=-2).abs()
    lines = torch.tensor(lines, device=x.device, dtype=torch.long)
    gh = torch.isin(torch.arange(dh.shape[-1], device=x.device), lines)
    gv = torch.isin(torch.arange(dv.shape[-2], device=x.device), lines)
    grid = torch.cat([dh[..., gh].flatten(1), dv[..., gv, :].flatten(1)], 1)
    rest = torch.cat([dh[..., ~gh].flatten(1), dv[..., ~gv, :].flatten(1)], 1)
    return grid.mean(1) / rest.mean(1)

def blockiness(x):
    """step_ratio across the 8-px grid a patch decoder or JPEG prints: pixel 8k-1 to 8k, k >= 1."""
    return step_ratio(x, list(range(7, max(x.shape[-2:]), 8)))

def _online():  # one 3 s probe of the hub (or HF_ENDPOINT's mirror)
    u = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    with contextlib.suppress(OSError), socket.create_connection((u.hostname, u.port or 443), 3):
        return True
    return False

class Scorer:
    """Metrics made on first use; one that fails to load or to score stays unavailable."""

    def __init__(self, cols, device, crop_border=0):
        self.cols, self.device, self.models, self.unavailable = cols, device, {}, {}
        self.crop_border = crop_border  # PSNR and SSIM skip this many pixels at each border (BasicSR)

    def _fail(self, col, e):
        offline = any(k in type(e).__name__ for k in ("URLError", "LocalEntry", "Connection", "Timeout"))
        why = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:120]
        self.unavailable[col] = ("weights not downloadable (offline?): " if offline else "") + why
        print(f"{col} unavailable: {self.unavailable[col]}")

    def get(self, col):
        if col in self.unavailable or col in self.models:
            return self.models.get(col)
        name, opts = next((m[1], m[2]) for m in METRICS if m[0] == col)
        if name is None:  # ours: nothing to download
            with contextlib.redirect_stdout(io.StringIO()):
                self.models[col] = blockiness if col == "Blockiness" else common.load_lpips(self.device, "random")
            return self.models[col]
        if "HF_HUB_OFFLINE" not in os.environ and not _online():  # no minutes of retries
            os.environ["HF_HUB_OFFLINE"] = "1"
            if "huggingface_hub" in sys.modules:  # a method imported it and read the variable then
                sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # torch.hub downloads have no timeout of their own
        try:
            with warnings.catch_warnings(action="ignore"), contextlib.redirect_stdout(io.StringIO()):
                import pyiqa
                self.models[col] = pyiqa.create_metric(name, device=self.device, **opts).eval()
        except Exception as e:
            self._fail(col, e)
        finally:
            socket.setdefaulttimeout(old)
        return self.models.get(col)

    @torch.no_grad()
    def compute(self, col, sr, hr=None):
        """A float, or None if unavailable. sr and hr are (1, 3, H, W) in [0, 1] on self.device, or
        the folders for FID; nr metrics ignore hr."""
        if (m := self.get(col)) is None:
            return None
        inputs = (sr,) if KIND[col] == "nr" else (sr, hr)
        c = self.crop_border
        if c and col in ("PSNR", "SSIM"):
            inputs = [x[..., c:-c, c:-c] for x in inputs]
        try:
            with warnings.catch_warnings(action="ignore"), contextlib.redirect_stdout(io.StringIO()):
                v = m(*inputs, num_workers=0, verbose=False) if col == "FID" else m(*inputs)
            v = float(v.mean() if torch.is_tensor(v) else v)
            if not math.isfinite(v):
                raise ValueError(f"non-finite value {v}")
            return v
        except Exception as e:
            self._fail(col, e)

def _mean(values):  # over every image, or None
    return None if None in values else sum(values) / len(values)

# ------------------------------------------------------------ benchmarks
# paired: LR/ + HR/; lr: LR/ only (no-reference metrics); synthetic: HR/, or a released LR/ + HR/
BENCHES = {"DIV2K-val": "synthetic", "RealSR": "paired", "DRealSR": "paired",
           "RealLQ250": "lr", "RealSet65": "lr", "sample": "synthetic"}
STABLESR = ("RealSR", "DRealSR")  # the sets StableSR cropped: OSEDiff's, TEASR's, TSD-SR's tables
_TAG = re.compile(r"(?:[_-](?:hr|lr\d*|sr|x\d)|(?<=\d)x\d)$", re.IGNORECASE)

def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]

def stem_key(path):  # Canon_001_LR4 -> Canon_001, 0801x4 -> 0801
    return _TAG.sub("", _stem(path)) or _stem(path)

def _by_key(files):
    m = {}
    for f in files:
        k = stem_key(f)
        if m.setdefault(k, f) != f:
            raise SystemExit(f"two files with the same stem {k!r}: {m[k]} and {f}")
    return m

def pair_by_stem(a_files, b_files):
    """(pairs [(key, a, b)], keys only in a, keys only in b), pairing by stem_key."""
    a, b = _by_key(a_files), _by_key(b_files)
    pairs = [(k, a[k], b[k]) for k in sorted(a) if k in b]
    return pairs, sorted(set(a) - set(b)), sorted(set(b) - set(a))

def _images(folder):  # [] for a missing or empty folder (list_images exits on those)
    return sorted(f for f in glob.glob(f"{folder}/**/*", recursive=True) if f.lower().endswith(common.IMG_EXTS))

def _layout_error(bench, root, what):
    lay = {"paired": f"{root}/LR/*.png and {root}/HR/*.png (same file stems)", "lr": f"{root}/LR/*.png",
           "synthetic": f"{root}/HR/*.png (LR made with degrade.py) or {root}/LR + {root}/HR"}[BENCHES[bench]]
    return SystemExit(f"benchmark {bench}: {what}. Expected {lay}; see the README, data and benchmarks.")

def report_unpaired(what_a, only_a, what_b, only_b):
    for what, keys in ((what_a, only_a), (what_b, only_b)):
        if keys:
            print(f"unpaired: {len(keys)} {what}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}")

def load_bench(bench, data_root, degrade_seed=0, limit=0, degrade="realesrgan", protocol="full"):
    """The first `limit` [(key, lr, hr or None)] of a benchmark, and its HR folder or None."""
    if bench not in BENCHES:
        raise SystemExit(f"unknown --bench {bench!r}; choose from {', '.join(BENCHES)}")
    if protocol == "stablesr" and bench not in STABLESR:
        raise SystemExit(f"--protocol stablesr: StableSR's test crops are of {' and '.join(STABLESR)}, not {bench}")
    root = os.path.join(data_root, *["StableSR"] * (protocol == "stablesr"), bench)
    hr_dir, lr_dir, kind = os.path.join(root, "HR"), os.path.join(root, "LR"), BENCHES[bench]
    if bench == "sample":  # the held-out photos, written once as an HR folder
        for name in common.SAMPLE_HELDOUT:
            f = os.path.join(hr_dir, name + ".png")
            if not os.path.exists(f):
                common.save_image(common.sample_photos([name])[0], f)
    if not os.path.isdir(root):
        raise _layout_error(bench, root, f"folder {root} not found")
    hr, lr = _images(hr_dir), _images(lr_dir)
    if kind == "synthetic" and hr and not lr:  # made once, cached per preset and seed
        lr_dir = os.path.join(root, ("LR" if degrade == "realesrgan" else f"LR_{degrade}") + f"_seed{degrade_seed}")
        make_lr(hr[: limit or None], lr_dir, degrade_seed, PRESETS[degrade])
        lr = _images(lr_dir)
    if not lr or (kind != "lr" and not hr):
        raise _layout_error(bench, root, f"no images in {hr_dir if kind != 'lr' and not hr else lr_dir}")
    if kind == "lr":
        return [(stem_key(f), f, None) for f in lr][: limit or None], None
    pairs, only_lr, only_hr = pair_by_stem(lr, hr)
    report_unpaired("LR without HR", only_lr, "HR without LR", only_hr)
    if not pairs:
        raise _layout_error(bench, root, "no LR/HR pair with the same file stem")
    return pairs[: limit or None], hr_dir

# ------------------------------------------------------------ running a method
METHODS = "bicubic, strsr, fluxsr, smfsr, teasr"

def build_fn(method, ckpt, device, steps, seed, samplers=None, **flags):
    """The SR function: bicubic, or the method script's build_sampler on `ckpt` with the `flags`."""
    if method == "bicubic":
        return common.upsample_lr
    if not ckpt:
        raise SystemExit(f"--method {method} needs --ckpt (a checkpoint or training output folder)")
    build = (samplers or {}).get(method)
    try:  # a running script passes its own build_sampler: a second import would load it twice
        mod = sys.modules[build.__module__] if build else importlib.import_module(method)
        build = build or mod.build_sampler
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--method {method}: no build_sampler ({e}); choose {METHODS}")
    return build(mod.Config(ckpt=ckpt, steps=steps, seed=seed, **flags), str(device))

def _append(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")

def _read_cache(path):  # records are flat: a line cut by an interruption does not end in "}"
    with open(path) if os.path.exists(path) else io.StringIO() as f:
        return [json.loads(l) for l in f if l.rstrip().endswith("}")]

def write_outputs(items, run_dir, make_fn, device, run_info):
    """<key>.png of each LR the same run has not done; its s/img and mem_GB to scores.jsonl."""
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
    for k, lr in tqdm(todo, desc=f"sr {os.path.basename(run_dir)}", disable=len(todo) < 2):
        x_lr = common.load_image(lr)[None]  # (1, 3, h, w), on the CPU as common.sample_files passes it
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            x_sr = fn(x_lr)  # (1, 3, 4h, 4w)
        sync(device)
        sec = time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else common.peak_rss_gb()
        tmp = os.path.join(run_dir, f".{k}.png")  # hidden until complete
        common.save_image(x_sr, tmp)
        os.replace(tmp, os.path.join(run_dir, k + ".png"))
        _append(cache, {"image": k, "set": "gen", "sec": sec, "mem_GB": mem})

# ------------------------------------------------------------ scoring and tables
def _hash(*paths):  # of the files' bytes: a changed output or HR is scored again
    h = hashlib.sha1()
    for p in filter(None, paths):
        h.update(open(p, "rb").read())
    return h.hexdigest()[:16]

def _match(x_sr, x_hr, key):
    """x_hr cropped to the size of x_sr when larger by less than the scale (not a multiple of 4)."""
    (h, w), (H, W) = x_sr.shape[-2:], x_hr.shape[-2:]
    if not (0 <= H - h < 4 and 0 <= W - w < 4):
        raise SystemExit(f"{key}: output {w}x{h} vs HR {W}x{H}: not a x4 output of this HR")
    return x_hr[..., :h, :w]

def score(name, dataset, pairs, run_dir, scorer, sr_dir, hr_dir):
    """The table row of `name` on `dataset`: each metric's mean over pairs [(key, sr, hr or None)],
    the per-image scores cached in run_dir/scores.jsonl."""
    crop = f"-crop{scorer.crop_border}" if scorer.crop_border else ""  # another cache key and row
    os.makedirs(run_dir, exist_ok=True)
    cache = os.path.join(run_dir, "scores.jsonl")
    done, recs = {}, _read_cache(cache)
    gen = {r["image"]: r for r in recs if r.get("set") == "gen"}  # write_outputs' timings
    for r in recs:
        done.setdefault((r["image"], r.get("key")), {}).update({c: r[c] for c in COLS if c in r})
    has_hr, haves = all(hr for _, _, hr in pairs), []  # haves: each image's scores
    per_image = [c for c in scorer.cols if KIND[c] == "nr" or (KIND[c] == "fr" and has_hr)]
    for k, sr, hr in tqdm(pairs, desc="score", disable=len(pairs) < 2):
        key = _hash(sr, hr) + crop
        have = done.setdefault((k, key), {})
        haves.append(have)
        todo = [c for c in per_image if c not in have and c not in scorer.unavailable]
        if not todo:
            continue
        x_sr = common.load_image(sr)[None].to(scorer.device)  # (1, 3, H, W)
        x_hr = _match(x_sr, common.load_image(hr)[None].to(scorer.device), k) if hr else None
        for kind in ("fr", "nr"):  # one cache line per image per metric set
            got = {c: scorer.compute(c, x_sr, x_hr) for c in todo if KIND[c] == kind}
            new = {c: v for c, v in got.items() if v is not None}
            if new:
                _append(cache, {"image": k, "key": key, "set": kind, **new})
                have.update(new)
    row = {"method": name, "dataset": dataset + crop, "n": len(pairs)}
    row.update({c: _mean([h.get(c) for h in haves]) for c in per_image})
    if "FID" in scorer.cols and has_hr and hr_dir:  # per folder, keyed by all its files
        fkey = _hash(*[p for pair in pairs for p in pair[1:]])
        fid = done.get(("*", fkey), {}).get("FID")
        if fid is None:
            fid = scorer.compute("FID", sr_dir, hr_dir)
            if fid is not None:
                _append(cache, {"image": "*", "key": fkey, "set": "fid", "FID": fid})
        row["FID"] = fid
    timed = [gen[k] for k, _, _ in pairs if k in gen]  # none for outputs made elsewhere: "-"
    if timed:
        row["s/img"] = sum(r["sec"] for r in timed) / len(timed)
        row["mem_GB"] = max(r["mem_GB"] for r in timed)
    row["unavailable"] = {c: scorer.unavailable.get(c, "not computed for every image") for c in row if row[c] is None}
    return row

def write_tables(rows, out_dir):
    """Merge rows into out_dir/results.json by (method, dataset); rewrite results.md and .csv."""
    os.makedirs(out_dir, exist_ok=True)
    path, new = os.path.join(out_dir, "results.json"), {(r["method"], r["dataset"]) for r in rows}
    old = json.load(open(path)) if os.path.exists(path) else []
    rows = [r for r in old if (r["method"], r["dataset"]) not in new] + rows
    cols = [c for c in COLS if any(c in r for r in rows)] + ["s/img", "mem_GB"]  # those requested
    arrow = {m[0]: " ↑" if m[4] else " ↓" for m in METRICS}
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |\n"

    def cell(r, c):  # -: not scored (no HR), n/a: not computable here
        if c not in r:
            return "-"
        return "n/a" if r[c] is None else format(r[c], FMT.get(c, ".4f"))
    md = line(["Method", "Dataset", "N"] + [c + arrow.get(c, "") for c in cols])
    md += "|" + "---|" * (len(cols) + 3) + "\n"
    md += "".join(line([r["method"], r["dataset"], r["n"]] + [cell(r, c) for c in cols]) for r in rows)
    notes = dict.fromkeys(f"{c}: {why}" for r in rows for c, why in r.get("unavailable", {}).items())
    if notes:
        md += "\nn/a = unavailable, never estimated; - = not applicable (no HR) or not requested.\n"
        md += "".join(f"- {n}\n" for n in notes)
    open(os.path.join(out_dir, "results.md"), "w").write(md)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w, head = csv.writer(f), ["method", "dataset", "n"]
        w.writerow(head + cols)
        w.writerows([r[h] for h in head] + ["" if r.get(c) is None else r[c] for c in cols] for r in rows)
    json.dump(rows, open(path, "w"), indent=1)
    return md

def run_method(a, method, scorer, device, samplers=None):
    """One row per benchmark for `method` (outputs cached, see the module docstring)."""
    learned = method != "bicubic"  # bicubic has no checkpoint and no sampler flags
    fix = f"+{a.color_fix}" if a.color_fix != "none" and learned else ""
    name = a.name or method + (f"-{a.steps}step" if a.steps > 1 else "") + fix
    ckpt = os.path.abspath(common.latest_checkpoint(a.ckpt) or a.ckpt) if a.ckpt and learned else ""
    flags = dict(color_fix=a.color_fix, dtype=a.dtype) if learned else {}
    # the outputs' origin (a newer ckpt-* included): a change remakes them
    run = dict(method=method, ckpt=ckpt, steps=a.steps, seed=a.seed, **flags)
    # built on first need: a resumed run with all outputs on disk loads no model
    make_fn = functools.cache(lambda: build_fn(method, a.ckpt, device, a.steps, a.seed, samplers, **flags))
    rows = []
    for bench in _split(a.bench):
        items, hr_dir = load_bench(bench, a.data_root, a.degrade_seed, a.limit, a.degrade, a.protocol)
        label = bench + ("-stablesr" if a.protocol == "stablesr" else "")
        run_dir = os.path.join(a.out_dir, name, label)
        write_outputs(items, run_dir, make_fn, device, {**run, "lr": os.path.abspath(os.path.dirname(items[0][1]))})
        pairs = [(k, os.path.join(run_dir, k + ".png"), hr) for k, _, hr in items]
        rows.append(score(name, label, pairs, run_dir, scorer, run_dir, hr_dir))
    return rows

def score_folder(a, scorer):
    """--sr: one row for outputs on disk, paired with --hr by stem, or no-reference metrics only."""
    if not os.path.isdir(a.sr) or (a.hr and not os.path.isdir(a.hr)):
        raise SystemExit(f"--sr {a.sr!r} / --hr {a.hr!r}: expected folders of images")
    if a.hr:
        pairs, only_sr, only_hr = pair_by_stem(_images(a.sr), _images(a.hr))
        report_unpaired("SR without HR", only_sr, "HR without SR", only_hr)
    else:
        pairs = [(k, f, None) for k, f in _by_key(_images(a.sr)).items()]
    pairs = pairs[: a.limit or None]
    if not pairs:
        raise SystemExit(f"--sr {a.sr}: no images{' paired by stem with --hr ' + a.hr if a.hr else ''}")
    # the labels: data/RealSR/HR -> RealSR, out/eval/M/RealSR -> M
    hr, sr = os.path.normpath(a.hr or "custom"), os.path.normpath(a.sr)
    dataset = os.path.basename(os.path.dirname(hr) if os.path.basename(hr) == "HR" else hr)
    name = a.name or os.path.basename(os.path.dirname(sr) if os.path.basename(sr) == dataset else sr)
    run_dir = os.path.join(a.out_dir, "scored", name, dataset)
    return score(name, dataset, pairs, run_dir, scorer, a.sr, a.hr or None)

# ------------------------------------------------------------ hooks for the method scripts
def prefetch():
    """`python common.py prefetch`: each pyiqa metric's weights into its cache; -> the failures."""
    scorer = Scorer([m[0] for m in METRICS if m[1]], torch.device("cpu"))
    for col in scorer.cols:
        if scorer.get(col) is not None:  # a failure prints its reason
            print(f"{col}: ready")
    return [f"{col}: {why}" for col, why in scorer.unavailable.items()]

VAL_COLS = ["PSNR", "SSIM", "LPIPS-rand", "Blockiness"]  # offline and cheap
CROPS = [(64, 160), (336, 128), (128, 344)]  # (top, left) of astronaut's face, badge and shuttle

def heldout(method, build_sampler, out_dir, degrade="realesrgan", data_root="data"):
    """End of a mini run: bicubic's and the method's table on the held-out photo, and compare.png,
    128 px crops (rows) of LR (nearest) | bicubic | method | HR, each pixel a 2x2 square."""
    from PIL import Image, ImageDraw
    ev = os.path.join(out_dir, "eval")
    argv = ["--method", f"bicubic,{method}", "--ckpt", out_dir, "--bench", "sample", "--degrade", degrade,
            "--data_root", data_root, "--out_dir", ev, "--metrics", ",".join(VAL_COLS)]
    rows = main(argv, {method: build_sampler})
    k, lr, hr = load_bench("sample", data_root, degrade=degrade)[0][0]  # the files the table scored
    files = [lr] + [os.path.join(ev, m, "sample", k + ".png") for m in ("bicubic", method)] + [hr]
    ims = [Image.open(f).convert("RGB") for f in files]
    ims[0] = ims[0].resize((ims[0].width * 4, ims[0].height * 4), Image.NEAREST)
    sheet = Image.new("RGB", (4 * 260 - 4, 16 + len(CROPS) * 260 - 4), "white")  # cells 256 px, 4 apart
    for j, (im, label) in enumerate(zip(ims, ["LR (nearest)", "bicubic", method, "HR"])):
        ImageDraw.Draw(sheet).text((j * 260 + 2, 2), label, fill="black")
        for i, (t, l) in enumerate(CROPS):
            sheet.paste(im.crop((l, t, l + 128, t + 128)).resize((256, 256), Image.NEAREST), (j * 260, 16 + i * 260))
    path = os.path.join(out_dir, "compare.png")
    sheet.save(path)
    print(f"written: {path} ({k}: LR nearest | bicubic | {method} | HR)")
    return rows

def validation(method, build_sampler, cfg, device):
    """--val_every's fn(ckpt) -> (method's, bicubic's) {metric: mean} on --val's HR images or the
    held-out photo, their LR made once as heldout's; outputs rounded to 8 bits like heldout's PNGs."""
    if cfg.val:
        hr = common.list_images(cfg.val)
        lr_dir = os.path.join(cfg.out_dir, "val", f"LR_{cfg.degrade}")
        make_lr(hr, lr_dir, 0, PRESETS[cfg.degrade])
        pairs = [(stem_key(f), os.path.join(lr_dir, _stem(f) + ".png"), f) for f in hr]
    else:
        pairs = load_bench("sample", cfg.data_root, degrade=cfg.degrade)[0]
    scorer, device = Scorer(VAL_COLS, device), torch.device(device)
    images = [(k, common.load_image(lr)[None], common.load_image(hr)[None].to(device)) for k, lr, hr in pairs]

    def scores(sr):
        rows = []
        for k, x_lr, x_hr in images:
            with torch.no_grad():
                x_sr = sr(x_lr).clamp(0, 1).mul(255).round().div(255).to(device)
            x_hr = _match(x_sr, x_hr, k)
            rows.append({c: scorer.compute(c, x_sr, x_hr) for c in VAL_COLS})
        means = {c: _mean([r[c] for r in rows]) for c in VAL_COLS}
        return {c: v for c, v in means.items() if v is not None}

    bicubic = scores(common.upsample_lr)

    def val(ckpt):
        with torch.random.fork_rng(devices=[]):  # a sampler's init draws leave the run's untouched
            return scores(build_sampler(dataclasses.replace(cfg, ckpt=ckpt), str(device))), bicubic
    return val

# ------------------------------------------------------------ main
def _split(s):  # "a, b," -> ["a", "b"]
    return [x.strip() for x in s.split(",") if x.strip()]

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--method", default="", help=f"comma-separated: {METHODS} (build_sampler)")
    p.add_argument("--ckpt", default="", help="checkpoint folder, or a training out_dir (latest ckpt-*)")
    p.add_argument("--bench", default="sample", help=f"comma-separated: {', '.join(BENCHES)}")
    p.add_argument("--data_root", default="data")
    p.add_argument("--protocol", default="full", choices=["full", "stablesr"],
                   help="RealSR, DRealSR: full images (StrSR, FluxSR) or StableSR's 512 px crops (OSEDiff, TEASR)")
    p.add_argument("--crop_border", type=int, default=0, help="PSNR, SSIM without this many pixels at each border")
    p.add_argument("--out_dir", default="out/eval")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--color_fix", default="none", help="the samplers' --color_fix: none, wavelet, adain")
    p.add_argument("--dtype", default="", help="the samplers' --dtype: bf16, fp16, fp32 (default: bf16 on GPU)")
    p.add_argument("--degrade_seed", type=int, default=0, help="seed of the DIV2K-val / sample LR images")
    p.add_argument("--degrade", default="realesrgan", help="degrade.PRESETS name of those LR images (mini: bicubic)")
    p.add_argument("--sr", default="", help="score this folder of outputs instead of running a method")
    p.add_argument("--hr", default="", help="HR folder for --sr (omit: no-reference metrics only)")
    p.add_argument("--name", default="", help="row label (default: method, -Kstep appended when K > 1)")
    p.add_argument("--metrics", default=",".join(COLS), help="comma-separated subset of " + ",".join(COLS))
    p.add_argument("--limit", type=int, default=0, help="first N images only (quick checks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)

def main(argv=None, samplers=None):
    a = parse_args(argv)
    check_preset(a.degrade)
    cols = _split(a.metrics)
    bad = [c for c in cols if c not in COLS]
    if bad:
        raise SystemExit(f"--metrics: unknown {bad}; choose from {', '.join(COLS)}")
    scorer = Scorer([c for c in COLS if c in cols], torch.device(a.device), a.crop_border)
    methods = _split(a.method)
    if a.sr:
        rows = [score_folder(a, scorer)]
    elif not methods:
        raise SystemExit(f"give --method ({METHODS}) or --sr DIR [--hr DIR]")
    elif a.name and len(methods) > 1:
        raise SystemExit("--name labels one method's row; give one --method with it")
    else:
        rows = [row for m in methods for row in run_method(a, m, scorer, scorer.device, samplers)]
    print(write_tables(rows, a.out_dir) + f"written: {os.path.join(a.out_dir, 'results.md')} (.csv, .json)")
    return rows

if __name__ == "__main__":
    main()
