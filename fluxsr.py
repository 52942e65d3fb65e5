"""
FluxSR: One Diffusion Step to Real-World Super-Resolution via Flow Trajectory Distillation
(Li, Cao, Guo, Li, Zhang; ICML 2025, arXiv:2502.01993). The authors released no code: this
file is a from-the-paper implementation of its Algorithm 1.

A one-step x4 SR model distilled from FLUX.1-dev, which is both the base and the teacher. The
teacher never runs during training: it first writes (eps, z_0) noise-image pairs to disk
(`--make_pairs`), and training needs only those pairs, the base with a LoRA and the VAE.

Notation (rectified flow, t = 1 is noise): z_0 the teacher's latent for noise eps, x_0 its decoded
image, x_lr = Real-ESRGAN degradation of x_0, z_L = VAE-encode(bicubic x4 of x_lr). The base's
velocity v_theta(z, t) with the LoRA; T_L the time the LR latent sits at.
    (13)  z_0 = eps - u_t,   z_L = eps - (1 - T_L) u^L_t,   z_L - z_0 = u^SR T_L
    (14)  u^L_t = (u_t - u^SR T_L) / (1 - T_L),   t in [T_L, 1]
    (15)  v_phi(z_t, t) = (u_t - v_theta(z_t, t) T_L) / (1 - T_L)          (LR flow, implied)
    (16)  z_t = (1 - t)/(1 - T_L) z_L + (t - T_L)/(1 - T_L) eps,   t ~ U[T_L, 1]
    (17)  L_FTD = || (1 - T_L) v_phi - (eps - z_L) ||^2 = || (u_t - v_theta(z_t, t) T_L) - (eps - z_L) ||^2
          with u_t = eps - z_0 exact from the stored pair
    (18)  G(z_L) = z_L - v_theta(z_L, T_L) T_L                             (the one-step generator)
    (19)  TV-LPIPS(I, I0) = LPIPS(I, I0) + gamma LPIPS(TV(I), TV(I0))
    (20)  TV(I)_ij = |I_i+1,j - I_ij| + |I_i,j+1 - I_ij|
    (21)  L_Rec = MSE(x0_hat, x_0) + lambda TV-LPIPS(x0_hat, x_0),   x0_hat = decode(G(z_L))
    (22-23) A_bar = mean_i A_i;  L_ADL = mean_l mean_i cos(A_i^(l), A_bar^(l))  (every block l)
    Alg. 1 line 19:  L = L_FTD + L_Rec + mu L_ADL
Checking Eq. 17: u_t - (eps - z_L) = z_L - z_0, so L_FTD = || (z_L - z_0) - T_L v_theta(z_t, t) ||^2:
it is zero exactly when v_theta(z_t, t) = (z_L - z_0) / T_L = u^SR (Eq. 13, third line) at every
point of the segment, which is what makes the generator of Eq. 18 land on z_0 from z_L. The two
lines of Eq. 17 are equal because (1 - T_L) v_phi = u_t - v_theta T_L by Eq. 15.

Launch:
    python fluxsr.py --make_pairs 2400                           # teacher pairs into --data (once)
    torchrun --nproc_per_node=8 fluxsr.py --make_pairs 2400      # the same, pair i on rank i % 8
    torchrun --nproc_per_node=8 fluxsr.py                        # train (resumes from out_dir)
    python fluxsr.py --sample --ckpt out/fluxsr --input lr/ --output sr/
    python fluxsr.py --model tiny --make_pairs 16 && python fluxsr.py --model tiny   # CPU smoke run
    python fluxsr.py --model mini --make_pairs 512 && python fluxsr.py --model mini  # CPU, the mini base, table vs bicubic

What differs from the paper, and why:
- Unknown in the paper, chosen here (`# ours` in Config): T_L, gamma, lambda, mu, LoRA rank and
  targets, lr, batch, teacher steps. T_L should be the base's time whose states x_t look most like
  z_L; a data-driven estimate is ||z_L - z_0|| / ||eps - z_0|| over the pairs.
- The LR is degraded from x_0 without USM sharpening: the FTD target is the teacher latent z_0, so
  the reconstruction target is the teacher image x_0 itself, not a sharpened copy.
- ADL is taken on the generator's forward pass (Alg. 1 computes it after line 13; the paper does
  not say which pass), on image tokens only.
- The FTD and generator passes go through the DiT as one batch of 2B (one call, one backward):
  the same math as two calls, one launch, one FSDP all-gather.
- `--crop` smaller than the pair size trains on aligned random crops (offsets on the 16-px token
  grid) of eps, z_0 and x_0; the default, like the paper, uses the whole 1024 px pair.
- Sec. 5.3 trains ablations for 30k iterations; the main run's length is not given.
"""
import contextlib, dataclasses, glob, json, math, os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
from degrade import PRESETS as DEGRADE, degrade

DEFAULT_MODEL = "flux1-dev"
# LoRA on every linear of the attention and MLPs of both block types (regex: peft full-matches
# it against module names; double blocks' attn.to_out is a ModuleList, so its Linear is to_out.0)
LORA_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                r"to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)")


# --------------------------------------------------------------------------- config
@dataclasses.dataclass
class Config:
    model: str = DEFAULT_MODEL    # Sec. 4: FLUX.1-dev is base and teacher; --model tiny -> tiny-flux1
    model_path: str = ""          # local folder of the base (default: the hub id)
    data: str = "out/fluxsr/pairs"  # teacher pairs (Sec. 5.1: no real images); --make_pairs writes here
    data_root: str = "data"       # unused: FluxSR trains on teacher pairs only (shared field)
    degrade: str = "realesrgan"   # LR of training and eval: a degrade.PRESETS name (paper: Real-ESRGAN); mini: bicubic (ours)
    out_dir: str = "out/fluxsr"
    make_pairs: int = 0           # > 0: write pairs 0..N-1 to --data and exit (Sec. 5.1: 2400)
    pair_batch: int = 1           # ours: pairs per teacher call in --make_pairs (the pairs do not depend on it)
    pair_size: int = 1024         # Sec. 5.1: 1024x1024 pairs
    teacher_steps: int = 28       # ours: FLUX.1-dev's usual Euler steps (paper: "multi-step")
    guidance: float = 3.5         # FLUX.1-dev's distilled guidance default; teacher and student
    T_L: float = 0.5              # ours: time of the LR latent (Eq. 13-18); see the docstring
    gamma: float = 1.0            # ours: TV term of TV-LPIPS (Eq. 19)
    lam: float = 1.0              # ours: lambda, TV-LPIPS weight in L_Rec (Eq. 21)
    mu: float = 0.01              # ours: ADL weight (Alg. 1 line 19); small, it acts on every block
    lora_rank: int = 64           # ours; 0: full fine-tuning (the mini base)
    lora_alpha: float = 64.0      # ours: alpha = rank, LoRA scale 1
    lr: float = 5e-5              # ours: AdamW (0.9, 0.999), no weight decay, constant
    grad_clip: float = 1.0        # ours
    lr_decay: float = 0.0         # ours: lr x half cosine to 0 over this last fraction of the steps; 0: constant
    max_steps: int = 30000        # Sec. 5.3 (ablation length)
    batch_size: int = 8           # ours: global batch
    micro_batch: int = 1          # per rank per forward
    crop: int = 1024              # whole pair (Sec. 5.1); smaller: aligned random crops (ours)
    seed: int = 0
    log_every: int = 10
    save_every: int = 1000
    grid_every: int = 500
    num_workers: int = 2
    grad_ckpt: bool = True        # gradient checkpointing of DiT and VAE decoder (GPU only)
    fsdp: bool = False            # FSDP2 via common.shard_fsdp2
    sample: bool = False          # --sample mode
    ckpt: str = ""                # checkpoint folder or out_dir (latest ckpt-*) to sample from
    input: str = ""               # LR image or folder
    output: str = "out/fluxsr/sr"
    steps: int = 1                # one step (Eq. 18); the model has no other step count
    tile: int = 128               # ours: latent tile, 1024 px = the training size
    overlap: int = 32             # ours: 256 px
    eval_heldout: bool = False    # ours: at the end, eval.py on the held-out sample photos vs bicubic (mini: on)


# --model tiny: small sizes unless the flag was given (values equal to the default are replaced)
TINY = dict(max_steps=20, pair_size=64, crop=64, teacher_steps=4, lora_rank=8, lora_alpha=8.0, batch_size=2, tile=8, overlap=2)
# --model mini (ours): 2400 steps on 512 teacher pairs, ~12 min on 1 CPU thread after the base's
# pretraining (README, "mini"): full fine-tuning (a LoRA on a 2M base stays below bicubic for hundreds
# of steps), and lam 0: offline the VGG of TV-LPIPS is random, not a perceptual loss, and would be most
# of a CPU step
MINI = dict(max_steps=2400, pair_size=128, crop=128, lora_rank=0, lam=0.0, lr=1e-3, lr_decay=0.5, batch_size=4,
            tile=32, overlap=8, grid_every=100, save_every=100, eval_heldout=True, degrade="bicubic", pair_batch=16)


def resolve(cfg):
    """Preset name, with the tiny overrides applied and the settings checked."""
    preset = common.resolve_preset(cfg.model, DEFAULT_MODEL)
    if common.PRESETS[preset].family != "flux1":
        raise SystemExit(f"--model {cfg.model}: FluxSR is defined on FLUX.1 (guidance-distilled, packed tokens)")
    common.small_defaults(cfg, preset, TINY, MINI)
    common.check_degrade(cfg.degrade)
    if cfg.pair_size % 16 or cfg.crop % 16 or cfg.crop > cfg.pair_size:
        raise SystemExit(f"--crop {cfg.crop} and --pair_size {cfg.pair_size}: expected multiples of 16, crop <= pair_size")
    if cfg.pair_batch < 1:
        raise SystemExit(f"--pair_batch {cfg.pair_batch}: expected at least 1")
    if not 0 < cfg.T_L < 1:
        raise SystemExit(f"--T_L {cfg.T_L}: expected 0 < T_L < 1")
    return preset


def empty_prompt(preset, cfg, dit, device, cache_dir, rank):
    """The paper's empty prompt: encoded once (rank 0 first, the others read its cache)."""
    if common.PRESETS[preset].hub is None and not cfg.model_path:
        return {k: v.to(device) for k, v in common.tiny_cond(dit, "flux1").items()}
    ddp = dist.is_initialized()
    if ddp and rank != 0:
        dist.barrier()  # wait for rank 0 to write the cache
    cond = common.prompt_cond(preset, "", cache_dir, device, cfg.model_path or None)
    if ddp and rank == 0:
        dist.barrier()
    return cond


# --------------------------------------------------------------------------- model wrapping
class BlockFeatures:
    """Image-token outputs A^(l) of every transformer block (Eq. 22-23), through forward hooks.
    In diffusers 0.42 both FluxTransformerBlock and FluxSingleTransformerBlock return
    (txt, img); older versions returned the concatenated [txt, img] from single blocks, so the
    caller keeps the last N tokens. Hooks record only inside `record()`: gradient checkpointing
    re-runs each block (and its hooks) during backward, when recording is off, so nothing is
    counted twice."""

    def __init__(self, dit):
        self.on, self.feats = False, []
        blocks = list(dit.transformer_blocks) + list(dit.single_transformer_blocks)
        self.handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, module, args, out):
        if self.on:
            self.feats.append(out[-1] if isinstance(out, tuple) else out)

    @contextlib.contextmanager
    def record(self, enabled=True):
        self.feats, self.on = [], enabled
        try:
            yield self.feats
        finally:
            self.on = False


def G(z_L, v_theta, T_L):
    return z_L - v_theta * T_L  # Eq. (18)


def one_step(dit, z_L, T_L, cond, guidance):
    """The FluxSR generator: one DiT call at t = T_L on the LR latent."""
    t = torch.full((z_L.shape[0],), T_L, device=z_L.device)
    return G(z_L, common.velocity("flux1", dit, z_L, t, common.expand_cond(cond, z_L.shape[0]), guidance), T_L)


# --------------------------------------------------------------------------- losses
def ftd_z_t(z_L, eps, t, T_L):
    """The LR-to-noise line: z_L at t = T_L, eps at t = 1."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) / (1 - T_L) * z_L + (t - T_L) / (1 - T_L) * eps  # Eq. (16)


def ftd_loss(u_t, v_theta, eps, z_L, T_L):
    """Flow Trajectory Distillation (Eq. 17), mean over elements. (1 - T_L) v_phi of Eq. 15 is
    written out as u_t - v_theta T_L (Eq. 17, second line): no division by 1 - T_L."""
    return ((u_t - v_theta * T_L) - (eps - z_L)).pow(2).mean()  # Eq. (17)


def tv(img):
    """Eq. 20 on (B, C, H, W): forward differences, cropped to (H - 1, W - 1)."""
    dy = (img[:, :, 1:, :-1] - img[:, :, :-1, :-1]).abs()
    dx = (img[:, :, :-1, 1:] - img[:, :, :-1, :-1]).abs()
    return dy + dx  # Eq. (20)


def tv_lpips(lpips, img, img0, gamma):
    return lpips(img, img0) + gamma * lpips(tv(img), tv(img0))  # Eq. (19)


def rec_loss(lpips, x0_hat, x_0, lam, gamma):
    """Eq. 21 on images in [0, 1]; returns (L_Rec, MSE, TV-LPIPS)."""
    mse = F.mse_loss(x0_hat, x_0)
    tvl = tv_lpips(lpips, x0_hat, x_0, gamma) if lam else mse.new_zeros(())  # lam 0: no VGG pass at all
    return mse + lam * tvl, mse, tvl  # Eq. (21)


def adl_loss(feats):
    """Attention Diversification Loss: feats is a list over blocks of (B, N, D) token features.
    Per image and block, the mean cosine of each token to the mean token (Eq. 22-23); averaged
    over images and blocks. 1 when all tokens are equal, 1/sqrt(N) for N orthonormal tokens."""
    per_block = []
    for A in feats:
        A = A.float()
        A_bar = A.mean(dim=1, keepdim=True)  # Eq. (22)
        per_block.append(F.cosine_similarity(A, A_bar, dim=-1).mean())  # Eq. (23), L_ADL^(l)
    return torch.stack(per_block).mean()  # Eq. (23), mean over l


# --------------------------------------------------------------------------- teacher pairs
def flux_sigmas(steps, n_tokens):
    """FLUX.1-dev's sampling schedule: linear sigmas from 1 to 1/steps, shifted towards noise by a
    resolution-dependent mu (0.5 at 256 tokens to 1.15 at 4096), then a final 0."""
    mu = 0.5 + (1.15 - 0.5) * (n_tokens - 256) / (4096 - 256)
    s = torch.linspace(1, 1 / steps, steps, dtype=torch.float64)
    s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    return torch.cat([s, s.new_zeros(1)]).float()


@torch.no_grad()
def teacher_sample(dit, eps, cond, steps, guidance):
    """The frozen base's multi-step Euler sampler from noise eps (B, C, H, W): the T2I flow to distil."""
    z, sigmas = eps, flux_sigmas(steps, eps.shape[-2] * eps.shape[-1] // 4).to(eps.device)
    cond = common.expand_cond(cond, eps.shape[0])
    for t, s in zip(sigmas[:-1], sigmas[1:]):
        z = z - (t - s) * common.velocity("flux1", dit, z, t.view(1), cond, guidance)  # Euler, t -> s
    return z


def pair_noise(seed, i, shape):
    """eps of pair i: seeded by the pair index, so pairs do not depend on the number of ranks."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))


def write_pair(folder, i, eps, z_0, x_0):
    """Pair i = one safetensors file (eps, z_0, x_0 as 8-bit), written under a temp name and renamed,
    so a killed run leaves the whole pair or none; a PNG of x_0 is written first, for people."""
    from safetensors.torch import save_file
    name, tmp = os.path.join(folder, f"pair-{i:06d}"), os.path.join(folder, f".tmp-pair-{i:06d}")
    common.save_image(x_0, tmp + ".png")
    os.replace(tmp + ".png", name + ".png")
    x8 = x_0.clamp(0, 1).mul(255).round().to(torch.uint8)
    save_file({"eps": eps[0].float().cpu().contiguous(), "z_0": z_0[0].float().cpu().contiguous(),
               "x_0": x8[0].cpu().contiguous()}, tmp + ".safetensors")
    os.replace(tmp + ".safetensors", name + ".safetensors")


def pair_manifest(cfg, preset):
    return {"preset": preset, "pair_size": cfg.pair_size, "teacher_steps": cfg.teacher_steps,
            "guidance": cfg.guidance, "seed": cfg.seed}


def make_pairs(cfg):
    """Sec. 4.2 / 5.1: sample the frozen teacher from stored noise; pair i on rank i % world;
    pairs already on disk are skipped, so a killed run continues where it stopped."""
    ddp, rank, local_rank, world, device = common.compute_init(cfg.seed)
    preset = resolve(cfg)
    os.makedirs(cfg.data, exist_ok=True)
    man_file, manifest = os.path.join(cfg.data, "pairs.json"), pair_manifest(cfg, preset)
    if rank == 0 and not os.path.exists(man_file):
        with open(man_file + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(man_file + ".tmp", man_file)
    if ddp:
        dist.barrier()
    with open(man_file) as f:
        if json.load(f) != manifest:
            raise SystemExit(f"{cfg.data} holds pairs made with other settings ({man_file}); use a new --data")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dit = common.load_dit(preset, cfg.model_path or None, dtype).to(device).requires_grad_(False).eval()
    vae = common.load_vae(preset, cfg.model_path or None, dtype).to(device)
    cond = empty_prompt(preset, cfg, dit, device, cfg.data, rank)
    h = cfg.pair_size // 8
    todo = [i for i in range(rank, cfg.make_pairs, world)
            if not os.path.exists(os.path.join(cfg.data, f"pair-{i:06d}.safetensors"))]
    print(f"rank {rank}: {len(todo)} of {len(range(rank, cfg.make_pairs, world))} pairs to write", flush=True)
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc="pairs", disable=rank != 0)
    for k in range(0, len(todo), cfg.pair_batch):  # --pair_batch pairs per teacher call
        idx = todo[k:k + cfg.pair_batch]
        eps = torch.cat([pair_noise(cfg.seed, i, (1, vae.config.latent_channels, h, h)) for i in idx]).to(device)
        with common.autocast(device):
            z_0 = teacher_sample(dit, eps, cond, cfg.teacher_steps, cfg.guidance)
            x_0 = common.decode(vae, "flux1", z_0).clamp(0, 1)
        for j, i in enumerate(idx):
            write_pair(cfg.data, i, eps[j:j + 1], z_0[j:j + 1], x_0[j:j + 1])
        bar.update(len(idx))
    bar.close()
    if ddp:
        dist.barrier()
    if rank == 0:
        print(f"{len(glob.glob(os.path.join(cfg.data, 'pair-*.safetensors')))} pairs in {cfg.data}", flush=True)


class PairDataset(torch.utils.data.Dataset):
    """Teacher pairs (eps, z_0, x_0). Items are keyed by (index, seed) like common.ImageDataset, so a
    crop is a pure function of the data position (exact resume, any number of ranks)."""

    def __init__(self, folder, crop):
        from safetensors.torch import load_file
        self.load, self.crop = load_file, crop
        self.files = sorted(glob.glob(os.path.join(folder, "pair-*.safetensors")))
        if not self.files:
            raise SystemExit(f"--data {folder}: no teacher pairs; write them first: python fluxsr.py --make_pairs N")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        i, seed = key
        p = self.load(self.files[i])
        eps, z_0, x_0 = p["eps"], p["z_0"], p["x_0"].float() / 255
        size, c = x_0.shape[-1], self.crop
        if c < size:  # aligned crop: pixel offsets on the 16-px token grid, latents at 1/8
            top, left = (16 * torch.randint(0, (size - c) // 16 + 1, (2,), generator=torch.Generator().manual_seed(seed))).tolist()
            x_0 = x_0[:, top:top + c, left:left + c]
            eps, z_0 = (z[:, top // 8:(top + c) // 8, left // 8:(left + c) // 8] for z in (eps, z_0))
        return eps, z_0, x_0


# --------------------------------------------------------------------------- sampler
def build_sampler(ckpt, device="cpu", steps=1, seed=0):
    """fn(x_lr (1, 3, h, w) in [0, 1]) -> (1, 3, 4h, 4w): bicubic x4, encode, one step of Eq. 18
    over latent tiles, decode. Deterministic (no noise), so `seed` is unused."""
    if steps != 1:
        raise SystemExit(f"--steps {steps}: FluxSR is a one-step model (Eq. 18)")
    found, cfg = common.checkpoint_config(ckpt, Config)
    preset, device = resolve(cfg), torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dit = common.add_lora(common.load_dit(preset, cfg.model_path or None, dtype), cfg.lora_rank, cfg.lora_alpha, LORA_TARGETS)
    state = common.load_checkpoint(found, {"dit": dit}, restore_rng=False)
    dit = dit.to(device).eval()
    vae = common.load_vae(preset, cfg.model_path or None, dtype).to(device)
    if common.PRESETS[preset].hub is not None:
        vae.enable_tiling()  # full-resolution encode/decode of large images
    cond = {k: v.to(device) for k, v in state["cond"].items()}

    def latent(z_L):  # Eq. 18 over latent tiles
        return common.tiled(lambda z: one_step(dit, z, cfg.T_L, cond, cfg.guidance), z_L, cfg.tile, cfg.overlap)
    return lambda x_lr: common.super_resolve(vae, "flux1", x_lr, latent)


# --------------------------------------------------------------------------- training
def fluxsr_losses(cfg, dit, vae, lpips, feats, cond2, eps, z_0, x_0, g):
    """Algorithm 1, lines 5-19, on one micro-batch of teacher pairs. cond2 is the prompt for 2B."""
    B, T_L = eps.shape[0], cfg.T_L
    # 5: (eps, x_0, z_0) ~ D; the LR side is made here: degrade x_0, bicubic x4, encode -> z_L
    with torch.no_grad():
        x_lr, _ = degrade(x_0, scale=4, opts=dataclasses.replace(DEGRADE[cfg.degrade], use_usm=False), generator=g)
        with common.autocast(x_0.device):
            z_L = common.encode(vae, "flux1", common.upsample_lr(x_lr))
    # 6: the teacher's exact velocity from the stored pair
    u_t = eps - z_0
    # 8: t ~ U[T_L, 1]
    t = T_L + (1 - T_L) * torch.rand(B, device=eps.device)
    # 9: z_t on the segment from z_L (t = T_L) to eps (t = 1)
    z_t = ftd_z_t(z_L, eps, t, T_L)  # Eq. (16)
    # 10 + 13: v_theta(z_t, t) for FTD and v_theta(z_L, T_L) for the generator, one batched call;
    # ADL features are recorded on this call (the generator half is used, line 18)
    with common.autocast(eps.device), feats.record(enabled=cfg.mu > 0) as A:
        v = common.velocity("flux1", dit, torch.cat([z_t, z_L]), torch.cat([t, torch.full_like(t, T_L)]), cond2, cfg.guidance)
    v_t, v_L = v.chunk(2)
    # 10-11: v_phi = (u_t - v_theta T_L) / (1 - T_L) (Eq. 15), L_FTD of Eq. 17
    l_ftd = ftd_loss(u_t, v_t, eps, z_L, T_L)
    # 13: z0_hat = z_L - v_theta(z_L, T_L) T_L (Eq. 18)
    z0_hat = G(z_L, v_L, T_L)
    # 14: x0_hat = D(z0_hat)
    with common.autocast(eps.device):
        x0_hat = common.decode(vae, "flux1", z0_hat)
    # 15-16: L_Rec = MSE + lambda TV-LPIPS against the teacher image x_0 (Eq. 19-21)
    l_rec, l_mse, l_tvl = rec_loss(lpips, x0_hat.float(), x_0, cfg.lam, cfg.gamma)
    # 18: L_ADL over every block's image tokens of the generator pass (Eq. 22-23)
    n_img = z_L.shape[-2] * z_L.shape[-1] // 4
    l_adl = adl_loss([a[B:, -n_img:] for a in A]) if A else torch.zeros((), device=eps.device)
    # 19: L = L_FTD + L_Rec + mu L_ADL
    loss = l_ftd + l_rec + cfg.mu * l_adl
    terms = {"loss": loss, "ftd": l_ftd, "rec": l_rec, "mse": l_mse, "tv_lpips": l_tvl, "adl": l_adl}
    return loss, terms, (x_lr, x0_hat)


def train(cfg):
    ddp, rank, local_rank, world, device = common.compute_init(cfg.seed)
    preset = resolve(cfg)
    log = common.Logger(cfg.out_dir, rank == 0)
    log(json.dumps(dataclasses.asdict(cfg)))
    man_file = os.path.join(cfg.data, "pairs.json")
    if os.path.exists(man_file):
        with open(man_file) as f:
            man = json.load(f)
        if man["preset"] != preset or man["pair_size"] < cfg.crop:
            raise SystemExit(f"pairs in {cfg.data} are {man['preset']} at {man['pair_size']} px; training "
                             f"{preset} with crop {cfg.crop} needs pairs from the same base, at least crop px")
    ds = PairDataset(cfg.data, cfg.crop)  # before the models: a missing folder fails fast

    # 1. models (Alg. 1 line 3): v_theta <- base + trainable LoRA; VAE and base frozen; no teacher
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dit = common.load_dit(preset, cfg.model_path or None, dtype)
    with torch.random.fork_rng(devices=[]):  # the same LoRA init on every rank
        torch.manual_seed(cfg.seed)
        dit = common.add_lora(dit, cfg.lora_rank, cfg.lora_alpha, LORA_TARGETS)
    dit = dit.to(device).train()
    vae = common.load_vae(preset, cfg.model_path or None, dtype).to(device)
    if cfg.grad_ckpt and device.type == "cuda":
        dit.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()  # the decoder backward of line 14 at 1024 px
    if cfg.fsdp:
        dit = common.shard_fsdp2(dit)
    feats = BlockFeatures(dit)
    with torch.random.fork_rng(devices=[]):  # offline its backbone is random: the same on every rank
        torch.manual_seed(cfg.seed)
        lpips = common.load_lpips(device, pretrained=not common.is_tiny(preset)) if cfg.lam else None
    cond = empty_prompt(preset, cfg, dit, device, cfg.out_dir, rank)
    cond2 = common.expand_cond(cond, 2 * cfg.micro_batch)

    # 2. optimizer on the LoRA only, grad clip
    params = [p for p in dit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    log(f"{preset}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable LoRA parameters")

    # 3. resume
    g = torch.Generator(device).manual_seed(1_000_003 + cfg.seed * world + rank)  # degradations
    start_step, ckpt = 0, common.latest_checkpoint(cfg.out_dir)
    if ckpt:
        start_step = common.load_checkpoint(ckpt, {"dit": dit}, {"opt": opt}, generators={"degrade": g})["step"]
        log(f"resumed from {ckpt} at step {start_step}")

    # 4. loader of teacher pairs: data position = step
    if cfg.batch_size % (world * cfg.micro_batch):
        raise SystemExit(f"--batch_size {cfg.batch_size} must divide by ranks {world} x --micro_batch {cfg.micro_batch}")
    accum = cfg.batch_size // (world * cfg.micro_batch)
    sampler = common.StepSampler(len(ds), cfg.batch_size, rank, world, cfg.seed, start_step)
    loader = iter(torch.utils.data.DataLoader(ds, batch_size=cfg.micro_batch, sampler=sampler, num_workers=cfg.num_workers,
                                              persistent_workers=cfg.num_workers > 0, generator=torch.Generator()))
    log(f"{len(ds)} teacher pairs, batch {cfg.batch_size} = {world} ranks x {accum} accum x {cfg.micro_batch}")

    # 5. loop (Alg. 1 lines 4-21)
    log.start()
    for step in range(start_step + 1, cfg.max_steps + 1):
        sums = {}
        for _ in range(accum):
            eps, z_0, x_0 = (x.to(device, non_blocking=True) for x in next(loader))
            loss, terms, (x_lr, x0_hat) = fluxsr_losses(cfg, dit, vae, lpips, feats, cond2, eps, z_0, x_0, g)
            (loss / accum).backward()
            sums = {k: sums.get(k, 0) + v.detach() / accum for k, v in terms.items()}
        # 20: update v_theta (its LoRA)
        common.set_lr([opt], step, cfg.max_steps, cfg.lr_decay)
        common.optimizer_step([params], [opt], cfg.grad_clip)
        log.step(step, cfg.max_steps, sums, device, cfg.log_every)
        if rank == 0 and (step % cfg.grid_every == 0 or step == cfg.max_steps):
            common.save_grid(os.path.join(cfg.out_dir, "grids", f"step-{step}.png"), x_lr, x0_hat.detach().clamp(0, 1), x_0)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            common.save_checkpoint(cfg.out_dir, step, cfg, {"dit": dit}, {"opt": opt},
                                   extra={"cond": {k: v.detach().cpu() for k, v in cond.items()}}, generators={"degrade": g})
    if rank == 0 and cfg.eval_heldout:
        common.heldout_eval("fluxsr", cfg.out_dir, cfg.degrade)
    return dit


if __name__ == "__main__":
    cfg = common.parse_config(Config)
    if cfg.sample:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        common.sample_files(build_sampler(cfg.ckpt or cfg.out_dir, dev, cfg.steps, cfg.seed), cfg.input, cfg.output)
    elif cfg.make_pairs:
        make_pairs(cfg)
    else:
        train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
