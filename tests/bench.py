"""What a training step and a one-step SR cost (run by hand, not by pytest).

    python tests/bench.py --gpu              # GPU readiness: each method at its paper setting on real-size random
                                             # networks (no hub): 3 training steps and one-step SR to 1024 px, beside
                                             # the plan's prediction (run `--plan --batch 1` first)
    python tests/bench.py --gpu --sizes tiny # the same script on tiny networks (SR of a 64 px LR), on any device: a
                                             # check of the bench
    python tests/bench.py                    # CPU: the tiny and mini presets, ms per step and per SR
    python tests/bench.py --degrade realesrgan  # images/s of degrade.py's degradation, on the CPU and any GPU
    python tests/bench.py --plan             # what GPU each paper run needs: every method and stage traced at real
                                             # size on the CPU with fake tensors (tests/plan.py), no GPU, ~10 min

The paper setting is each Config's defaults (bf16 frozen weights on GPU, the paper's LoRA rank, gradient
checkpointing, the paper's crop) at batch 1 per GPU: StrSR stage 1 at 1024 px, FluxSR at 1024 px on two random
teacher pairs, SMFSR's gan stage (the heaviest; after one step of teacher and isc) at 512 px, TEASR at 512 px. Every
method runs in a fresh process, so its peak memory is its own. A method that does not fit says so (with one GPU
there is nothing to shard over: a base that does not fit needs --fsdp across GPUs). Random bf16 weights may give
NaN losses; speed and memory do not depend on them.
"""
import argparse, contextlib, functools, gc, json, os, platform, re, statistics, subprocess, sys, tempfile, time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
import common  # noqa: E402
from real_sizes import REAL, VAE, build, count  # noqa: E402

METHODS = {"strsr": "flux2", "fluxsr": "flux1", "smfsr": "sd3", "teasr": "qwen"}
SR_LR = {"real": 256, "tiny": 64}  # the LR side of the timed SR: to 1024 px; tiny networks, a check, to 256 px
BASE = {"flux1": "flux1-dev", "flux2": "flux2-klein", "zimage": "zimage", "sd3": "sd35-medium", "qwen": "qwen-image"}


@contextlib.contextmanager
def building(device, dtype):
    """Modules built inside are made on `device` in `dtype` directly (20B parameters never pass through the CPU)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def use_real_sizes(device, tiny):
    """Make the method scripts build real-size random networks: presets real-<family> (no hub, so every network is a
    random stand-in and nothing is downloaded) with the published configs, and the stand-ins at their real sizes."""
    import smfsr, strsr
    for fam, base in BASE.items():
        small = common.PRESETS[f"tiny-{fam}"]
        common.PRESETS[f"real-{fam}"] = common.Preset(fam, None, base, small.dit if tiny else REAL[base][2],
                                                      small.vae if tiny else VAE[fam])
    load = common._load

    def load_on_device(cls_name, preset, path, sub, config, dtype):
        with building(device, dtype):
            return load(cls_name, preset, path, sub, config, dtype)
    common._load = load_on_device
    common.tiny_cond = functools.partial(common.tiny_cond, length=256)  # the prompt stand-in: 256 tokens
    if not tiny:
        vlm = REAL["qwen3-vl-4b"][2]
        strsr.tiny_vlm_config = lambda: __import__("transformers").Qwen3VLConfig(**vlm)
        strsr.RANDOM_TRUNK = (dict(depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072)), 1024)  # convnext_xxlarge
        smfsr.RANDOM_DINO = dict(REAL["dinov3-vitb16"][2])

    def on_device(init, dtype):
        def init_there(self, *a, **k):
            with building(device, dtype):
                init(self, *a, **k)
        return init_there
    vlm_dtype = torch.bfloat16 if device.type in ("cuda", "meta") else torch.float32  # as from_pretrained(bf16)
    for cls, dtype in ((strsr.VLMEncoder, vlm_dtype), (strsr.Discriminator, torch.float32),
                       (smfsr.Discriminator, torch.float32)):
        cls.__init__ = on_device(cls.__init__, dtype)


def gpu_job(method, tiny, out):
    """One method: 3 training steps at the paper setting, then one-step SR of a 256 px LR to 1024 px (tiny: 64 px to
    256 px; a warm-up call, then a timed one). Prints a JSON line."""
    import importlib
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    use_real_sizes(device, tiny)
    mod, model = importlib.import_module(method), f"real-{METHODS[method]}"
    small = dict(crop=64, pair_size=64, lora_rank=8, lora_alpha=8, fake_rank=4, disc_width=16) if tiny else {}
    fields = mod.Config.__dataclass_fields__
    kw = dict(model=model, max_steps=3, batch_size=1, micro_batch=1, num_workers=0, log_every=1, save_every=10**9,
              grid_every=10**9, **{k: v for k, v in small.items() if k in fields})
    base = BASE[METHODS[method]]
    row = dict(method=method, base=base, params=None if tiny else count(build(base, "meta")) / 1e9)
    try:
        if method == "fluxsr":  # two random teacher pairs at the paper's size (the teacher is not what is timed)
            cfg = mod.resolve(mod.Config(**kw, data=os.path.join(out, "pairs"), out_dir=out))
            os.makedirs(cfg.data, exist_ok=True)
            h = cfg.pair_size // 8
            for i in range(2):
                mod.write_pair(cfg.data, i, torch.randn(1, 16, h, h), torch.randn(1, 16, h, h),
                               torch.rand(1, 3, cfg.pair_size, cfg.pair_size), mod.pair_manifest(cfg))
            kw["data"] = cfg.data
        if method == "smfsr":  # the gan stage starts from a teacher and an isc checkpoint: one step each
            for stage, init in (("teacher", ""), ("isc", os.path.join(out, "teacher"))):
                mod.train(mod.Config(**{**kw, "max_steps": 1}, stage=stage, init_ckpt=init,
                                     out_dir=os.path.join(out, stage)))
            kw.update(stage="gan", init_ckpt=os.path.join(out, "isc"))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        mod.train(mod.Config(**kw, out_dir=os.path.join(out, "run")))
        with open(os.path.join(out, "run", "log.txt")) as f:
            ms = [float(m) for m in re.findall(r"\| ([\d.]+) ms/step", f.read())]
        row.update(s_step=statistics.median(ms[1:]) / 1000, train_gb=peak_gb(cuda))
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        sr = mod.build_sampler(mod.Config(ckpt=os.path.join(out, "run")))
        x = torch.rand(1, 3, SR_LR["tiny" if tiny else "real"], SR_LR["tiny" if tiny else "real"])
        sr(x)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        sr(x)
        if cuda:
            torch.cuda.synchronize()
        row.update(sr_s=time.perf_counter() - t, sr_gb=peak_gb(cuda))
    except torch.OutOfMemoryError as e:
        row["note"] = f"did not fit: {str(e).splitlines()[0][:120]}"
    print("BENCH " + json.dumps(row), flush=True)


def peak_gb(cuda):
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else common.peak_rss_gb()


def gpu_table(methods, sizes):
    """Each method in its own process; the table."""
    if sizes == "real" and not torch.cuda.is_available():
        raise SystemExit("tests/bench.py --gpu needs a GPU (no CUDA device here); `--sizes tiny` checks the script")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {os.cpu_count()} cores"
    print(f"{dev} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')} | {sizes} sizes, random weights, bf16 "
          f"frozen weights on GPU | batch 1, gradient checkpointing, the paper's crop and LoRA rank\n")
    print(f"| method | base (DiT params) | s/step (3 steps) | peak GB, training | one-step SR to "
          f"{4 * SR_LR[sizes]} px, s | peak GB, SR | predicted s/step, GB (plan) | note |\n" + "|---" * 8 + "|")
    for method in methods:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.time()
            r = subprocess.run([sys.executable, __file__, "--job", method, sizes, out], capture_output=True,
                               text=True)
            line = [l for l in r.stdout.splitlines() if l.startswith("BENCH ")]
            if not line:
                print(f"| {method} | | | | | | | failed ({r.returncode}): "
                      f"{(r.stderr.strip().splitlines() or [''])[-1][:150]} |", flush=True)
                continue
            b = json.loads(line[-1][6:])
            f = lambda k, fmt: format(b[k], fmt) if b.get(k) is not None else "-"
            print(f"| {method} | {b['base']} ({f('params', '.2f')}B) | {f('s_step', '.2f')} | {f('train_gb', '.1f')} | "
                  f"{f('sr_s', '.2f')} | {f('sr_gb', '.1f')} | {predicted(method, dev)} | {b.get('note', '')} "
                  f"({time.time() - t0:.0f} s) |",
                  flush=True)


def predicted(method, device, path="out/plan.json"):
    """The plan's prediction of the --gpu setting (batch 1; SMFSR's gan stage), from `bench.py --plan --batch 1`."""
    stage = {"strsr": "1", "smfsr": "gan"}.get(method, "")
    rows = json.load(open(path)) if os.path.exists(path) else []
    r = next((r for r in rows if (r["method"], r["stage"], r.get("batch")) == (method, stage, 1)), None)
    if r is None:
        return "run --plan --batch 1"
    return f"{r['s_h100' if 'H100' in device else 's_paper']:.2f}, {r['predicted_gb']:.1f}"


# ----------------------------------------------------------------------------- CPU: tiny and mini presets
def cpu_table(methods, presets, steps):
    """ms per training step (median after the first) and per one-step SR of a 128 px LR, on this CPU."""
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | fp32 | batch 1 | {time.strftime('%Y-%m-%d')}\n")
    print("| method | preset | crop | ms/step | ms, SR 128 -> 512 px |\n|---|---|---|---|---|")
    for method in methods:
        for preset in presets:
            with tempfile.TemporaryDirectory() as out:
                r = subprocess.run([sys.executable, __file__, "--cpu_job", method, preset, out, str(steps)],
                                   capture_output=True, text=True)
                line = [l for l in r.stdout.splitlines() if l.startswith("BENCH ")]
                b = json.loads(line[-1][6:]) if line else {}
                print(f"| {method} | {preset} | {b.get('crop', '-')} | {b.get('ms', float('nan')):.0f} | "
                      f"{b.get('sr_ms', float('nan')):.0f} |" if b else f"| {method} | {preset} | failed: "
                      f"{(r.stderr.strip().splitlines() or [''])[-1][:150]} | | |", flush=True)


def cpu_job(method, preset, out, steps):
    import importlib
    mod = importlib.import_module(method)
    kw = dict(model=preset, max_steps=steps, batch_size=1, micro_batch=1, num_workers=0, log_every=1,
              save_every=10**9, grid_every=10**9, eval_heldout=False)
    if method == "fluxsr":
        mod.make_pairs(common.configure(mod.Config, model=preset, make_pairs=2, data=os.path.join(out, "pairs")))
        kw["data"] = os.path.join(out, "pairs")
    if method == "smfsr":
        for stage, init in (("teacher", ""), ("isc", os.path.join(out, "teacher"))):
            mod.train(common.configure(mod.Config, **{**kw, "max_steps": 1}, stage=stage, init_ckpt=init,
                                       out_dir=os.path.join(out, stage)))
        kw.update(stage="gan", init_ckpt=os.path.join(out, "isc"))
    cfg = common.configure(mod.Config, **kw, out_dir=os.path.join(out, "run"))
    mod.train(cfg)
    with open(os.path.join(out, "run", "log.txt")) as f:
        ms = [float(m) for m in re.findall(r"\| ([\d.]+) ms/step", f.read())]
    sr, x = mod.build_sampler(mod.Config(ckpt=os.path.join(out, "run"))), torch.rand(1, 3, 128, 128)
    sr(x)
    t = time.perf_counter()
    sr(x)
    crop = mod.resolve(cfg).crop if "crop" in mod.Config.__dataclass_fields__ else None
    print("BENCH " + json.dumps(dict(ms=statistics.median(ms[1:] or ms), sr_ms=1000 * (time.perf_counter() - t),
                                     crop=crop)), flush=True)


# ----------------------------------------------------------------------------- the degradation
def degrade_table(preset, scale=4, size=512, batches=(4, 16), images=64):
    """images/s of degrade.degrade at size x size HR for each batch size on each device present."""
    from degrade import PRESETS, check_preset, degrade
    check_preset(preset)
    opts, lr = PRESETS[preset], size // scale
    print(f"{size}x{size} HR -> {lr}x{lr} LR, preset {preset}, USM {'on' if opts.use_usm else 'off'}, {images} images "
          f"per row, so the random branches average out | torch {torch.__version__}\n")
    print("| device | batch | img/s | ms/img |\n|---|---|---|---|")
    for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        name = f"cpu, {torch.get_num_threads()} threads" if d == "cpu" else torch.cuda.get_device_name()
        sync = torch.cuda.synchronize if d == "cuda" else (lambda: None)
        for B in batches:
            g = torch.Generator(d).manual_seed(0)
            # smooth random content, so USM masks and Poisson level counts behave as on photos
            hr = torch.nn.functional.interpolate(torch.rand(B, 3, size // 8, size // 8, generator=g, device=d),
                                                 size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
            degrade(hr, scale, opts, g)  # warm-up
            sync()
            t0, n = time.perf_counter(), max(1, images // B)
            for _ in range(n):
                degrade(hr, scale, opts, g)
            sync()
            dt = time.perf_counter() - t0
            print(f"| {name} | {B} | {n * B / dt:.1f} | {1000 * dt / (n * B):.0f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="the GPU readiness table (real-size random networks)")
    p.add_argument("--sizes", default="real", choices=["real", "tiny"], help="--gpu: tiny checks the script anywhere")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--presets", default="tiny,mini", help="CPU: the presets")
    p.add_argument("--steps", type=int, default=4, help="CPU: training steps")
    p.add_argument("--degrade", metavar="PRESET", help="the degradation table instead: a degrade.PRESETS name")
    p.add_argument("--images", type=int, default=64, help="--degrade: images per row")
    p.add_argument("--plan", action="store_true", help="predicted peak GB and s/step of every paper run (CPU trace)")
    p.add_argument("--method", help="--plan: only these (strsr, strsr-z, fluxsr, smfsr, teasr; smfsr:gan a stage)")
    p.add_argument("--gpu_gb", type=float, help="--plan: your GPU's memory (default: each paper's GPU)")
    p.add_argument("--crop", type=int, help="--plan: HR crop (default: each paper's)")
    p.add_argument("--batch", type=int, help="--plan: per-GPU batch (default: each paper's)")
    p.add_argument("--job", nargs=3, help=argparse.SUPPRESS)  # method sizes out_dir (one process per method)
    p.add_argument("--cpu_job", nargs=4, help=argparse.SUPPRESS)  # method preset out_dir steps
    a = p.parse_args()
    if a.job:
        return gpu_job(a.job[0], a.job[1] == "tiny", a.job[2])
    if a.cpu_job:
        return cpu_job(*a.cpu_job[:3], int(a.cpu_job[3]))
    if a.plan:
        import plan
        return plan.main(a.method and a.method.split(","), a.gpu_gb, a.crop, a.batch)
    if a.degrade:
        return degrade_table(a.degrade, images=a.images)
    methods = a.methods.split(",")
    if a.gpu:
        return gpu_table(methods, a.sizes)
    cpu_table(methods, a.presets.split(","), a.steps)


if __name__ == "__main__":
    main()
