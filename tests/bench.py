"""Cost of every method against its floor, on this machine (run by hand, not by pytest).

    python tests/bench.py                          # all methods, tiny + small presets, CPU
    python tests/bench.py --methods strsr --presets small --steps 4

Training: ms per step (median after a warm-up step); the DiT passes one step makes, counted
with a hook on the first transformer block of every DiT the method builds (`fwd` without
grad, `fwd+bwd` with grad) and weighed by batch x tokens, so a call on 2B latents or on LR +
noise tokens counts as 2; the time of one such pass of the base DiT on the training latent of
one micro-batch; overhead = step time / (passes x pass time): what the step spends outside the
DiT (VAE, LPIPS, discriminator, data, degradation, optimizer).
Inference: ms per image for one-step SR at 128->512 and 512->2048 (tiled), the ratio to
VAE encode + one DiT forward + VAE decode at 512 (x16 by area for 2048), peak memory.
Peak memory on CPU is the peak resident set above the start of the measured phase.
"""
import argparse, dataclasses, importlib, json, os, platform, re, resource, statistics, subprocess, sys, tempfile, time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common

# A few million parameters per DiT: the shape of the real models, scaled down.
_KL = common.PRESETS["tiny-flux1"].vae
SMALL = {
    "small-flux1": common.Preset("flux1", None, "", dict(
        in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12)), _KL),
    "small-flux2": common.Preset("flux2", None, "", dict(
        in_channels=128, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=64, timestep_guidance_channels=64, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False),
        common.PRESETS["tiny-flux2"].vae),
    "small-zimage": common.Preset("zimage", None, "", dict(
        in_channels=16, dim=128, n_layers=4, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=64,
        axes_dims=[8, 12, 12], axes_lens=[256, 128, 128]), _KL),
    "small-sd3": common.Preset("sd3", None, "", dict(
        sample_size=32, in_channels=16, num_layers=6, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=32, out_channels=16,
        pos_embed_max_size=64), common.PRESETS["tiny-sd3"].vae),
    "small-qwen": common.Preset("qwen", None, "", dict(
        in_channels=64, out_channels=16, num_layers=6, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=64, axes_dims_rope=(8, 12, 12)), common.PRESETS["tiny-qwen"].vae),
}
common.PRESETS.update(SMALL)
DEFAULT_FAMILY = {"strsr": "flux2", "fluxsr": "flux1", "smfsr": "sd3", "teasr": "qwen"}
FIRST_BLOCK = ("transformer_blocks", "layers")
_raw_load = common.load_dit  # the uncounted loader, for the reference passes


# --------------------------------------------------------------------------- measuring
def peak_gb():
    """Peak memory of this process so far: resident set on CPU (ru_maxrss: imports, models and all),
    allocator peak on CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _tokens(args, kwargs):
    """Batch x tokens of the image stream entering the norm (its first tensor argument, (B, N, D))."""
    h = args[0] if args else next(iter(kwargs.values()), None)
    return h.shape[0] * h.shape[1] if torch.is_tensor(h) and h.dim() == 3 else 0


def hook_block0(dit, fn):
    """Hook the image-token pre-norm of the first block: it runs once per pass on each token stream,
    also where a method writes the block's forward out (SMFSR's LR tokens go through it separately)."""
    block = next(getattr(dit, n) for n in FIRST_BLOCK if getattr(dit, n, None) is not None)[0]
    norm = next(getattr(block, n) for n in ("norm1", "img_norm1", "attention_norm1") if hasattr(block, n))
    return norm.register_forward_pre_hook(fn, with_kwargs=True)


class PassCounter:
    """Counts DiT passes: a pre-hook in block 0 of every DiT that common.load_dit builds. A pass is
    weighed by its batch x tokens, so one call on a batch of 2B (or on 2x tokens: LR + noise) counts
    as two passes of the reference shape; `fwd` without grad, `fwd_bwd` with grad."""

    def __init__(self):
        self.fwd = self.fwd_bwd = 0
        self._load = common.load_dit

        def load(*a, **k):
            dit = self._load(*a, **k)
            hook_block0(dit, self._hook)
            return dit
        common.load_dit = load

    def _hook(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self.fwd_bwd += _tokens(args, kwargs)
        else:
            self.fwd += _tokens(args, kwargs)

    def reset(self):
        self.fwd = self.fwd_bwd = 0


def timed(fn, n=3):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def base_pass_ms(preset, latent_shape, device):
    """One base-DiT forward and forward+backward on a latent batch of the training shape."""
    fam = common.PRESETS[preset].family
    dit = _raw_load(preset).to(device)
    for p in dit.parameters():
        p.requires_grad_(True)
    cond = common.expand_cond({k: v.to(device) for k, v in common.tiny_cond(dit, fam).items()}, latent_shape[0])
    z, t = torch.randn(latent_shape, device=device), torch.full((latent_shape[0],), 0.5, device=device)

    def fwd():
        with torch.no_grad():
            common.velocity(fam, dit, z, t, cond)

    def fwd_bwd():
        common.velocity(fam, dit, z, t, cond).square().mean().backward()
    unit = []
    h = hook_block0(dit, lambda m, a, k: unit.append(_tokens(a, k)))
    fwd()
    h.remove()
    return timed(fwd), timed(fwd_bwd), unit[0]


# --------------------------------------------------------------------------- per method
def run_train(mod, method, preset, crop, steps, out_dir, counter, device):
    """Train `steps` steps; returns (median ms/step after the first, passes per step, peak GB, notes)."""
    # "tiny" gets each method's tiny settings (LoRA rank, ...); the small presets the paper's
    cfg = mod.Config(model="tiny" if preset.startswith("tiny") else preset, out_dir=out_dir, max_steps=steps,
                     log_every=1, save_every=10**6, grid_every=10**6, num_workers=0, crop=crop, batch_size=1,
                     micro_batch=1)  # one image per step, no accumulation: comparable across methods
    extra = []
    if method == "fluxsr":  # teacher pairs first (not timed: an offline stage)
        cfg = dataclasses.replace(cfg, pair_size=crop, data=out_dir + "-pairs")
        mod.make_pairs(dataclasses.replace(cfg, make_pairs=2, teacher_steps=4))
    if method == "smfsr":  # time the heaviest stage; the earlier ones only initialise it
        for stage in ("teacher", "isc"):
            mod.train(dataclasses.replace(cfg, stage=stage, max_steps=1, out_dir=out_dir + "-" + stage,
                                          **({"init_ckpt": out_dir + "-teacher"} if stage == "isc" else {})))
        cfg = dataclasses.replace(cfg, stage="gan", init_ckpt=out_dir + "-isc")
        extra = ["stage gan"]
    counter.reset()
    mod.train(cfg)
    gb = peak_gb()
    with open(os.path.join(out_dir, "log.txt")) as f:
        ms = [float(m) for m in re.findall(r"\| ([\d.]+) ms/step", f.read())]
    per_step = (counter.fwd / steps, counter.fwd_bwd / steps)
    return statistics.median(ms[1:] or ms), per_step, gb, extra


def run_infer(mod, preset, ckpt, device):
    fam = common.PRESETS[preset].family
    fn = mod.build_sampler(ckpt, device=device, steps=1, seed=0)
    rows = {}
    for lr in (128, 512):
        x = torch.rand(1, 3, lr, lr, device=device)
        with torch.no_grad():
            ms = timed(lambda: fn(x), n=1 if lr == 512 else 3)
        rows[lr] = (ms, peak_gb())  # 128 first, so the 512 peak is the tiled run's (or the 128's if larger)
    # floor: encode + one DiT forward + decode at 512x512, untiled
    dit, vae = _raw_load(preset).to(device), common.load_vae(preset).to(device)
    cond = {k: v.to(device) for k, v in common.tiny_cond(dit, fam).items()}
    x = torch.rand(1, 3, 512, 512, device=device)

    def floor():
        with torch.no_grad():
            z = common.encode(vae, fam, x)
            common.decode(vae, fam, common.velocity(fam, dit, z, torch.tensor([0.5], device=device), cond))
    f = timed(floor, n=2)
    return rows, f


def job(kind, method, size, out):
    """One measurement in this (fresh) process, so that its peak memory is its own; prints a JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mod, preset = importlib.import_module(method), f"{size}-{DEFAULT_FAMILY[method]}"
    crop = 64 if size == "tiny" else 128
    if kind == "train":
        counter = PassCounter()
        ms, (fwd, fwdbwd), gb, extra = run_train(mod, method, preset, crop, STEPS, out, counter, device)
        latent = (1, 128, crop // 16, crop // 16) if DEFAULT_FAMILY[method] == "flux2" else (1, 16, crop // 8, crop // 8)
        f_ms, fb_ms, unit = base_pass_ms(preset, latent, device)
        n_params = sum(p.numel() for p in _raw_load(preset).parameters()) / 1e6
        r = dict(ms=ms, fwd=fwd / unit, fwdbwd=fwdbwd / unit, f_ms=f_ms, fb_ms=fb_ms, gb=gb, extra=extra,
                 params=n_params, crop=crop, preset=preset)
    else:
        rows, fl = run_infer(mod, preset, common.latest_checkpoint(out), device)
        r = dict(rows=rows, floor=fl, preset=preset)
    print("BENCH " + json.dumps(r))


def sub(*args):
    """Run job() in a child process; its JSON line."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--job", *args], capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("BENCH ")]
    if out.returncode or not line:
        raise SystemExit(f"bench job {args} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[-1][6:])


STEPS = 3


def main():
    global STEPS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="strsr,fluxsr,smfsr,teasr")
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--job", nargs=4, help=argparse.SUPPRESS)  # kind method size out_dir (internal)
    args = p.parse_args()
    STEPS = args.steps
    if args.job:
        return job(*args.job)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = peak_gb()
    head = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores | torch {torch.__version__} | "
            f"threads {torch.get_num_threads()} | dtype fp32 | device {device} | batch 1 | {time.strftime('%Y-%m-%d')} | "
            f"peak GB = process peak RSS, {base:.2f} GB of it imports")
    train_rows, infer_rows = [], []
    tmp = tempfile.mkdtemp(prefix="bench-")
    for method in args.methods.split(","):
        for size in args.presets.split(","):
            t0, out = time.time(), os.path.join(tmp, f"{method}-{size}")
            r = sub("train", method, size, out)
            floor = r["fwd"] * r["f_ms"] + r["fwdbwd"] * r["fb_ms"]
            name = method + "".join(f" ({e})" for e in r["extra"])
            train_rows.append(f"| {name} | {r['preset']} ({r['params']:.2f}M) | {r['crop']} | {r['ms']:.0f} | "
                              f"{r['fwd']:.3g} / {r['fwdbwd']:.3g} | {r['f_ms']:.1f} / {r['fb_ms']:.1f} | "
                              f"{r['ms'] / floor if floor else float('nan'):.2f} | {r['gb']:.2f} |")
            print(train_rows[-1], file=sys.stderr, flush=True)
            i = sub("infer", method, size, out)
            (a_ms, a_gb), (b_ms, b_gb), fl = i["rows"]["128"], i["rows"]["512"], i["floor"]
            infer_rows.append(f"| {method} | {i['preset']} | {a_ms:.0f} | {a_ms / fl:.2f} | {a_gb:.2f} | "
                              f"{b_ms:.0f} | {b_ms / (16 * fl):.2f} | {b_gb:.2f} |")
            print(infer_rows[-1], f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(f"\n{head}\n")
    print("Training, one step (median of steps 2..N)\n")
    print("| method | preset (DiT params) | crop | ms/step | DiT passes fwd / fwd+bwd | base pass ms fwd / fwd+bwd | overhead | peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(train_rows))
    print("\nInference, one step\n")
    print("| method | preset | ms 128->512 | x floor | peak GB | ms 512->2048 (tiled) | x floor (16 x 512) | peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(infer_rows))


if __name__ == "__main__":
    main()
