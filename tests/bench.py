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
import argparse, dataclasses, importlib, os, platform, re, statistics, sys, tempfile, threading, time

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
class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms (CPU); CUDA: allocator peak."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = self._rss()
        self.run = True
        self.t = threading.Thread(target=self._poll, daemon=True)
        self.t.start()
        return self

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while self.run:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *a):
        if self.cuda:
            self.gb = (torch.cuda.max_memory_allocated() - self.base) / 2**30
        else:
            self.run = False
            self.t.join()
            self.gb = (max(self.peak, self._rss()) - self.base) / 2**30


def _tokens(args, kwargs):
    """Batch x tokens of the image stream entering a block (its first 3-D tensor argument)."""
    h = kwargs.get("hidden_states", kwargs.get("x", args[0] if args else None))
    return h.shape[0] * h.shape[1] if torch.is_tensor(h) and h.dim() == 3 else 0


def hook_block0(dit, fn):
    for name in FIRST_BLOCK:
        blocks = getattr(dit, name, None)
        if blocks is not None and len(blocks):
            return blocks[0].register_forward_pre_hook(fn, with_kwargs=True)


class PassCounter:
    """Counts DiT passes: a pre-hook on block 0 of every DiT that common.load_dit builds. A pass is
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
    """Train `steps` steps in-process; returns (median ms/step after the first, passes per step, peak GB)."""
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
    with PeakRSS() as mem:
        mod.train(cfg)
    with open(os.path.join(out_dir, "log.txt")) as f:
        ms = [float(m) for m in re.findall(r"\| ([\d.]+) ms/step", f.read())]
    per_step = (counter.fwd / steps, counter.fwd_bwd / steps)
    return statistics.median(ms[1:] or ms), per_step, mem.gb, extra


def run_infer(mod, preset, ckpt, device):
    fam = common.PRESETS[preset].family
    fn = mod.build_sampler(ckpt, device=device, steps=1, seed=0)
    rows = {}
    for lr in (128, 512):
        x = torch.rand(1, 3, lr, lr, device=device)
        with torch.no_grad(), PeakRSS() as mem:
            ms = timed(lambda: fn(x), n=1 if lr == 512 else 3)
        rows[lr] = (ms, mem.gb)
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="strsr,fluxsr,smfsr,teasr")
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    counter = PassCounter()
    head = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores | torch {torch.__version__} | "
            f"threads {torch.get_num_threads()} | dtype fp32 | device {device} | {time.strftime('%Y-%m-%d')}")
    train_rows, infer_rows = [], []
    tmp = tempfile.mkdtemp(prefix="bench-")
    for method in args.methods.split(","):
        mod = importlib.import_module(method)
        for size in args.presets.split(","):
            preset = f"{size}-{DEFAULT_FAMILY[method]}"
            crop = 64 if size == "tiny" else 128
            out = os.path.join(tmp, f"{method}-{preset}")
            t0 = time.time()
            ms, (fwd, fwdbwd), gb, extra = run_train(mod, method, preset, crop, args.steps, out, counter, device)
            latent = (1, 128, crop // 16, crop // 16) if DEFAULT_FAMILY[method] == "flux2" else (1, 16, crop // 8, crop // 8)
            micro = 1
            f_ms, fb_ms, unit = base_pass_ms(preset, (micro,) + latent[1:], device)
            fwd, fwdbwd = fwd / unit, fwdbwd / unit
            floor = fwd * f_ms + fwdbwd * fb_ms
            n_params = sum(p.numel() for p in _raw_load(preset).parameters()) / 1e6
            train_rows.append(f"| {method}{' (' + extra[0] + ')' if extra else ''} | {preset} ({n_params:.2f}M) | {crop} x{micro} | "
                              f"{ms:.0f} | {fwd:.3g} / {fwdbwd:.3g} | {f_ms:.1f} / {fb_ms:.1f} | {ms / floor:.2f} | {gb:.2f} |")
            rows, fl = run_infer(mod, preset, common.latest_checkpoint(out), device)
            infer_rows.append(f"| {method} | {preset} | {rows[128][0]:.0f} | {rows[128][0] / fl:.2f} | {rows[128][1]:.2f} | "
                              f"{rows[512][0]:.0f} | {rows[512][0] / (16 * fl):.2f} | {rows[512][1]:.2f} |")
            print(f"  {method} {preset}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"\n{head}\n")
    print("Training, one step (median of steps 2..N)\n")
    print("| method | preset (DiT params) | crop x micro-batch | ms/step | DiT passes fwd / fwd+bwd | base pass ms fwd / fwd+bwd | overhead | peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(train_rows))
    print("\nInference, one step\n")
    print("| method | preset | ms 128->512 | x floor | peak GB | ms 512->2048 (tiled) | x floor (16 x 512) | peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(infer_rows))


if __name__ == "__main__":
    main()
