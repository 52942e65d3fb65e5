"""
FluxSR: One Diffusion Step to Real-World Super-Resolution via Flow Trajectory Distillation
(Li, Cao, Guo, Li, Zhang; ICML 2025, arXiv:2502.01993). No code was released: this is Algorithm 1.

A one-step x4 SR model distilled from FLUX.1-dev, which is both the base and the teacher. The
teacher never runs during training: it first writes (eps, z_hr) noise-image pairs to disk
(`--make_pairs`), and training needs only those pairs, the base with a LoRA and the VAE.

Notation (rectified flow, t = 1 is noise): z_hr (the paper's z_0) the teacher's latent for noise
eps, x_hr its decoded image, x_lr its Real-ESRGAN degradation, z_lr (the paper's z_L) the latent of
bicubic x4 of x_lr; v_theta(z, t) the base's velocity with the LoRA; T_L the LR latent's time.
    (13)  z_hr = eps - u_t,   z_lr = eps - (1 - T_L) u^L_t,   z_lr - z_hr = u^SR T_L
    (14)  u^L_t = (u_t - u^SR T_L) / (1 - T_L),   t in [T_L, 1]
    (15)  v_phi(z_t, t) = (u_t - v_theta(z_t, t) T_L) / (1 - T_L)            (the LR flow, implied)
    (16)  z_t = (1 - t)/(1 - T_L) z_lr + (t - T_L)/(1 - T_L) eps,   t ~ U[T_L, 1]
    (17)  L_FTD = || (1 - T_L) v_phi - (eps - z_lr) ||^2 = || (u_t - v_theta(z_t, t) T_L) - (eps - z_lr) ||^2,
          u_t = eps - z_hr exact from the stored pair
    (18)  G(z_lr) = z_lr - v_theta(z_lr, T_L) T_L                               (the one-step generator)
    (19)  TV-LPIPS(I, I0) = LPIPS(I, I0) + gamma LPIPS(TV(I), TV(I0))
    (20)  TV(I)_ij = |I_i+1,j - I_ij| + |I_i,j+1 - I_ij|
    (21)  L_Rec = MSE(x_sr, x_hr) + lambda TV-LPIPS(x_sr, x_hr),   x_sr = VAE-decode(G(z_lr))
    (22-23) A_bar = mean_i A_i;  L_ADL = mean_l mean_i cos(A_i^(l), A_bar^(l))   (every block l)
    Alg. 1 line 19:  L = L_FTD + L_Rec + mu L_ADL
Checking Eq. 17: since u_t - (eps - z_lr) = z_lr - z_hr,
    L_FTD = || (z_lr - z_hr) - T_L v_theta(z_t, t) ||^2,
zero exactly when v_theta(z_t, t) = (z_lr - z_hr) / T_L = u^SR (Eq. 13) all along the segment, so
that the generator of Eq. 18 takes z_lr to z_hr.

    python fluxsr.py --make_pairs 2400                           # teacher pairs into --data (once)
    torchrun --nproc_per_node=8 fluxsr.py --make_pairs 2400      # the same, pair i on rank i % 8
    torchrun --nproc_per_node=8 fluxsr.py                        # train (resumes from out_dir)
    python fluxsr.py --sample --ckpt out/fluxsr --input lr/ --output sr/
    python fluxsr.py --model mini --make_pairs 2048 && python fluxsr.py --model mini  # CPU: the mini base

What differs from the paper, and why:
- Unknown in the paper, chosen here (`# ours` in Config): T_L, gamma, lambda, mu, the LoRA rank and
  targets, lr, batch, teacher steps. T_L should be the base's time whose states z_t look most like
  z_lr; a data-driven estimate is ||z_lr - z_hr|| / ||eps - z_hr|| over the pairs.
- The LR is degraded from x_hr without USM sharpening: the FTD target is the teacher latent z_hr, so
  the reconstruction target is the teacher image itself, not a sharpened copy.
- ADL is taken on the generator's pass (Alg. 1 computes it after line 13), image tokens only.
- The FTD and generator passes go through the DiT as one batch of 2B (one call, one backward): the
  same math as two calls, one launch, one FSDP all-gather.
- `--crop` smaller than the pair size trains on aligned random crops (offsets on the 16-px token
  grid) of eps, z_hr and x_hr; the default, like the paper, uses the whole 1024 px pair.
- Sec. 5.3 trains ablations for 30k iterations; the main run's length is not given.
- For the mini (ours): `--pairs_from sample` makes each pair from a photo: x_hr the photo crop, z_hr
  its latent, eps the teacher's sampler run backwards from z_hr (`teacher_sample(invert=True)`): a
  pair on the teacher's flow, like a generated one, with a photo at its end (a 2M teacher's own
  samples are not photos). `--zero_init` starts G(z_lr) at z_lr. `--w_rec` weighs L_Rec (Alg. 1: 1),
  since L_FTD's gradient, mostly from t > T_L, otherwise drowns the generator's.
- Pixel ranges: L_Rec's MSE (Eq. 21) is taken on [0, 1] images, the range of every image outside the
  VAE and of PSNR; the paper does not say. On [-1, 1] it would weigh 4x more against L_FTD.
"""
import contextlib, dataclasses, glob, json, math, os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
from degrade import PRESETS as DEGRADE, ImageDataset, check_preset, degrade, make_loader

# ------------------------------------------------------------ config
@dataclasses.dataclass
class Config(common.SampleFlags):  # + the shared sampling flags
    model: str = "flux1-dev"      # Sec. 4: FLUX.1-dev is base and teacher
    model_path: str = ""          # local folder of the base (else the preset's hub id)
    data: str = "out/fluxsr/pairs"  # Sec. 5.1: teacher pairs, no real images; --make_pairs writes them here
    degrade: str = "realesrgan"   # degrade.PRESETS name of the LR (paper: Real-ESRGAN)
    out_dir: str = "out/fluxsr"   # checkpoints, log.txt, grids/
    make_pairs: int = 0           # > 0: write pairs 0..N-1 to --data and stop (Sec. 5.1: 2400)
    pair_batch: int = 1           # ours: pairs per teacher call in --make_pairs (the pairs do not depend on it)
    pairs_from: str = ""          # paper: "" (the teacher samples noise); a data source: its photos inverted (ours)
    data_root: str = "data"       # folder of the named datasets (--pairs_from) and of the held-out photo
    pair_size: int = 1024         # Sec. 5.1: 1024x1024 pairs
    teacher_steps: int = 28       # ours: FLUX.1-dev's usual Euler steps (paper: "multi-step")
    guidance: float = 3.5         # FLUX.1-dev's distilled guidance default, teacher and student
    T_L: float = 0.5              # ours: the time of the LR latent (Eqs. 13-18); see the docstring
    tv_gamma: float = 1.0         # ours: gamma, the TV term's weight in TV-LPIPS (Eq. 19)
    w_tv_lpips: float = 1.0       # ours: lambda, TV-LPIPS's weight in L_Rec (Eq. 21)
    w_rec: float = 1.0            # Alg. 1 line 19: L_Rec's weight, 1
    w_adl: float = 0.01           # ours: mu, L_ADL's weight (Alg. 1 line 19); small, it acts on every block
    lpips_weights: str = ""       # a local torchvision VGG16 file for LPIPS (default: torch hub's)
    train_base: str = "lora"      # paper: a LoRA on the DiT; full: every DiT weight trains (ours, the mini)
    zero_init: bool = False       # ours: a new full fine-tuning zeroes the DiT's output layer: the step starts at z_lr
    lora_rank: int = 64           # ours
    lora_alpha: float = 64.0      # ours: alpha = rank, LoRA scale 1
    lr: float = 5e-5              # ours: AdamW (0.9, 0.999), no weight decay
    grad_clip: float = 1.0        # ours
    lr_decay: float = 0.0         # ours: half-cosine decay to 0 over this last fraction; 0: none
    max_steps: int = 30000        # Sec. 5.3 (the ablations' length)
    batch_size: int = 8           # ours: global batch
    micro_batch: int = 1          # ours: per rank per forward
    crop: int = 1024              # Sec. 5.1: the whole pair; smaller: aligned random crops (ours)
    seed: int = 0                 # ours
    log_every: int = 10           # ours
    save_every: int = 1000        # ours
    grid_every: int = 500         # ours
    num_workers: int = 2          # ours: data loader processes
    grad_ckpt: bool = True        # ours: gradient checkpointing of DiT and VAE decoder (GPU only)
    fsdp: bool = False            # ours: FSDP2 sharding of the frozen DiT over the ranks (FLUX.1-dev is 12B)
    sample: bool = False          # sample instead of training: --ckpt, --input, --output
    ckpt: str = ""                # checkpoint folder, or an out_dir (its latest ckpt-*)
    input: str = ""               # LR image or folder
    output: str = "out/fluxsr/sr"  # folder of the SR images
    steps: int = 1                # Eq. 18: one step, the model has no other step count
    tile: int = 0                 # latent tile; 0: ours, 128 (1024 px, the training size)
    overlap: int = 0              # latent overlap; 0: ours, 32 (256 px)
    eval_heldout: bool = False    # ours: at the end, the held-out photo scored against bicubic
    ema_decay: float = 0.0        # paper: 0 (no EMA); ours: e.g. 0.999, the trained weights' EMA
    ema: bool = True              # ours: --sample uses the checkpoint's EMA weights when saved
    val_every: int = 0            # ours: validate every N steps on --val (0: never)
    val: str = ""                 # ours: HR image or folder to validate on; "": the held-out photo

# --model tiny / mini (ours): these values for every flag not given
TINY = dict(max_steps=20, pair_size=64, crop=64, teacher_steps=4, lora_rank=8, lora_alpha=8.0, batch_size=2,
            tile=8, overlap=2)
# mini: pairs from the sample photos (a 2M teacher's are not photos); the whole DiT trains, from
# G(z_lr) = z_lr; L_Rec x30, else the generator barely moves; no TV-LPIPS (offline: a random VGG)
MINI = dict(max_steps=1200, pair_size=128, crop=128, pairs_from="sample", train_base="full", zero_init=True,
            w_rec=30.0, w_tv_lpips=0.0, lr=5e-4, lr_decay=0.5, batch_size=4, micro_batch=4, tile=32, overlap=8,
            grid_every=300, save_every=300, eval_heldout=True, degrade="bicubic", pair_batch=16)

def resolve(cfg):
    """The concrete preset and tile; the flags checked."""
    preset = common.resolve_preset(cfg.model, Config.model)
    if common.PRESETS[preset].family != "flux1":
        raise SystemExit(f"--model {cfg.model}: FluxSR is defined on FLUX.1 (guidance-distilled, packed tokens)")
    common.check_choices(cfg, train_base=("lora", "full"))
    check_preset(cfg.degrade)
    if cfg.fsdp and cfg.train_base == "full":
        raise SystemExit("--fsdp shards the frozen base; with --train_base full none of it is frozen")
    common.check_zero_init(cfg)
    if cfg.pair_size % 16 or cfg.crop % 16 or cfg.crop > cfg.pair_size:
        raise SystemExit(f"--crop {cfg.crop} and --pair_size {cfg.pair_size}: expected multiples of 16, crop <= "
                         f"pair_size")
    if cfg.pair_batch < 1 or not 0 < cfg.T_L < 1 or cfg.steps != 1:
        raise SystemExit(f"--pair_batch {cfg.pair_batch} --T_L {cfg.T_L} --steps {cfg.steps}: expected pair_batch "
                         f">= 1, 0 < T_L < 1, and one step (Eq. 18)")
    return dataclasses.replace(cfg, model=preset, tile=cfg.tile or 128, overlap=cfg.overlap or 32)

def pretrained(cfg):
    """Every pretrained network a run of cfg loads: checked before anything is built, fetched by
    `python common.py prefetch --method fluxsr`. The text encoders encode the empty prompt once."""
    return [common.base_weights(cfg, text=True)] + ([common.lpips_weights(cfg)] if cfg.w_tv_lpips else [])

# ------------------------------------------------------------ model
# a LoRA on every linear of the attention and MLPs of both block types (a regex, matched against
# whole module names; the double blocks' attn.to_out is a ModuleList, so its Linear is to_out.0)
LORA_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                r"to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)")

class BlockFeatures:
    """Image-token outputs A^(l) of every transformer block (Eqs. 22-23), through forward hooks. In
    diffusers 0.42 both FluxTransformerBlock and FluxSingleTransformerBlock return (txt, img); older
    versions returned the concatenated [txt, img] from single blocks, so the caller keeps the last N
    tokens. Hooks record only inside `record()`: gradient checkpointing re-runs each block (and its
    hooks) during backward, when recording is off."""

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

def G(z_lr, v_theta, T_L):
    return z_lr - v_theta * T_L  # Eq. (18)

def one_step(dit, z_lr, T_L, cond, guidance):
    """The one-step generator G(z_lr): one DiT call at t = T_L on the LR latent."""
    t = torch.full((z_lr.shape[0],), T_L, device=z_lr.device)
    return G(z_lr, common.velocity("flux1", dit, z_lr, t, common.expand_cond(cond, z_lr.shape[0]), guidance), T_L)

def build_generator(cfg, device):
    """v_theta to train (Alg. 1 line 3), on device: the base with a LoRA, the same init on every
    rank; and the frozen VAE. Returns (dit, vae)."""
    dtype = common.weight_dtype(device)
    dit = common.load_dit(cfg.model, cfg.model_path or None, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        dit = common.add_lora(dit, cfg.train_base, cfg.lora_rank, cfg.lora_alpha, LORA_TARGETS).to(device).train()
    return dit, common.load_vae(cfg.model, cfg.model_path or None, dtype, device)

# ------------------------------------------------------------ losses
def ftd_z_t(z_lr, eps, t, T_L):
    """The LR-to-noise segment: z_lr at t = T_L, eps at t = 1."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) / (1 - T_L) * z_lr + (t - T_L) / (1 - T_L) * eps  # Eq. (16)

def ftd_loss(u_t, v_theta, eps, z_lr, T_L):
    """Flow Trajectory Distillation (Eq. 17), mean over elements. (1 - T_L) v_phi of Eq. 15 is
    written out as u_t - v_theta T_L (Eq. 17, second line): no division by 1 - T_L."""
    return ((u_t - v_theta * T_L) - (eps - z_lr)).pow(2).mean()  # Eq. (17)

def tv(img):
    """Eq. 20 on (B, C, H, W): forward differences, cropped to (H - 1, W - 1)."""
    dy = (img[:, :, 1:, :-1] - img[:, :, :-1, :-1]).abs()
    dx = (img[:, :, :-1, 1:] - img[:, :, :-1, :-1]).abs()
    return dy + dx  # Eq. (20)

def tv_lpips(lpips, img, img0, gamma):
    return lpips(img, img0) + gamma * lpips(tv(img), tv(img0))  # Eq. (19)

def rec_loss(lpips, x_sr, x_hr, w_tv_lpips, gamma):
    """Eq. 21 on images in [0, 1]; returns (L_Rec, MSE, TV-LPIPS)."""
    mse = F.mse_loss(x_sr, x_hr)
    # weight 0: no VGG pass at all
    tvl = tv_lpips(lpips, x_sr, x_hr, gamma) if w_tv_lpips else mse.new_zeros(())
    return mse + w_tv_lpips * tvl, mse, tvl  # Eq. (21)

def adl_loss(feats):
    """Attention Diversification Loss: feats is a list over blocks of (B, N, D) token features. Per
    image and block, the mean cosine of each token to the mean token (Eqs. 22-23), averaged over
    images and blocks. 1 when all tokens are equal, 1/sqrt(N) for N orthonormal tokens."""
    per_block = []
    for A in feats:
        A = A.float()
        A_bar = A.mean(dim=1, keepdim=True)  # Eq. (22)
        per_block.append(F.cosine_similarity(A, A_bar, dim=-1).mean())  # Eq. (23), L_ADL^(l)
    return torch.stack(per_block).mean()  # Eq. (23), mean over l

def fluxsr_losses(dit, vae, lpips, feats, cond2, eps, z_hr, x_hr, cfg):
    """Algorithm 1, lines 5-19, on one micro-batch of teacher pairs; cond2 is the prompt for 2B.
    Returns (L, the terms, (x_lr, x_sr))."""
    B, T_L = eps.shape[0], cfg.T_L
    # 5: (eps, x_hr, z_hr) ~ D; the LR side is made here: degrade x_hr, bicubic x4, encode -> z_lr
    with torch.no_grad():
        x_lr, _ = degrade(x_hr, 4, dataclasses.replace(DEGRADE[cfg.degrade], use_usm=False))
        with common.autocast(x_hr.device):
            z_lr = common.encode(vae, "flux1", common.upsample_lr(x_lr))
    u_t = eps - z_hr  # 6: the teacher's exact velocity, from the stored pair
    t = T_L + (1 - T_L) * torch.rand(B, device=eps.device)  # 8: t ~ U[T_L, 1]
    z_t = ftd_z_t(z_lr, eps, t, T_L)  # 9: Eq. (16), from z_lr at t = T_L to eps at t = 1
    # 10 + 13: v_theta(z_t, t) for FTD and v_theta(z_lr, T_L) for the generator in one batched call;
    # ADL features are recorded on this call (the generator half is used, line 18)
    with common.autocast(eps.device), feats.record(enabled=cfg.w_adl > 0) as A:
        v = common.velocity("flux1", dit, torch.cat([z_t, z_lr]), torch.cat([t, torch.full_like(t, T_L)]), cond2,
                            cfg.guidance)
    v_t, v_lr = v.chunk(2)
    l_ftd = ftd_loss(u_t, v_t, eps, z_lr, T_L)  # 10-11: v_phi (Eq. 15) and L_FTD (Eq. 17)
    z0_hat = G(z_lr, v_lr, T_L)  # 13: Eq. (18)
    with common.autocast(eps.device):
        x_sr = common.decode(vae, "flux1", z0_hat)  # 14
    # 15-16: Eqs. (19-21)
    l_rec, l_mse, l_tvl = rec_loss(lpips, x_sr.float(), x_hr, cfg.w_tv_lpips, cfg.tv_gamma)
    # 18: L_ADL over every block's image tokens of the generator pass
    n_img = z_lr.shape[-2] * z_lr.shape[-1] // 4
    l_adl = adl_loss([a[B:, -n_img:] for a in A]) if A else torch.zeros((), device=eps.device)
    loss = l_ftd + cfg.w_rec * l_rec + cfg.w_adl * l_adl  # 19
    return loss, {"loss": loss, "ftd": l_ftd, "rec": l_rec, "mse": l_mse, "tv_lpips": l_tvl, "adl": l_adl}, (x_lr, x_sr)

# ------------------------------------------------------------ sampler
def build_sampler(flags, device=None):
    """fn(x_lr (1, 3, h, w) in [0, 1]) -> (1, 3, 4h, 4w) of the checkpoint flags.ckpt: bicubic x4,
    encode, one step of Eq. 18 over latent tiles, decode. Deterministic (no noise)."""
    path, cfg, device, dtype = common.sampler_setup(flags, resolve, pretrained, device)
    dit = common.add_lora(common.load_dit(cfg.model, cfg.model_path or None, dtype), cfg.train_base, cfg.lora_rank,
                          cfg.lora_alpha, LORA_TARGETS)
    state = common.load_checkpoint(path, {"dit": dit}, ema=cfg.ema)
    dit = common.sampling_weights(cfg, dtype, dit).to(device).eval()
    vae = common.load_vae(cfg.model, cfg.model_path or None, dtype, device, tiling=True)
    cond = {k: v.to(device) for k, v in state["cond"].items()}
    latent = lambda z_lr: common.tiled(lambda z: one_step(dit, z, cfg.T_L, cond, cfg.guidance), z_lr, cfg.tile,
                                       cfg.overlap)
    return common.finish_sampler(lambda x_lr: common.super_resolve(vae, "flux1", x_lr, latent), cfg)

# ------------------------------------------------------------ data: teacher pairs (Secs. 4.2, 5.1)
def flux_sigmas(steps, n_tokens):
    """FLUX.1-dev's sampling schedule: linear sigmas from 1 to 1/steps, shifted towards noise by a
    resolution-dependent mu (0.5 at 256 tokens to 1.15 at 4096), then a final 0."""
    mu = 0.5 + (1.15 - 0.5) * (n_tokens - 256) / (4096 - 256)
    s = torch.linspace(1, 1 / steps, steps, dtype=torch.float64)
    s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    return torch.cat([s, s.new_zeros(1)]).float()

@torch.no_grad()
def teacher_sample(dit, z, cond, steps, guidance, invert=False):
    """The frozen base's multi-step Euler sampler from noise z = eps (B, C, H, W): the T2I flow to
    distil. invert (--pairs_from): the same steps backwards, from a latent z at t = 0 up to the eps
    at t = 1 whose trajectory ends there (up to the steps' error)."""
    sigmas = flux_sigmas(steps, z.shape[-2] * z.shape[-1] // 4).to(z.device)
    sigmas, cond = sigmas.flip(0) if invert else sigmas, common.expand_cond(cond, z.shape[0])
    for t, s in zip(sigmas[:-1], sigmas[1:]):
        # Euler, t -> s
        z = z - (t - s) * common.velocity("flux1", dit, z, t.view(1), cond, guidance)
    return z

def pair_seed(seed, i):
    """The seed of pair i's eps or photo crop: from i alone, so no pair depends on the ranks."""
    return seed * 1_000_003 + i

def pair_noise(seed, i, shape):  # eps of pair i
    return torch.randn(shape, generator=torch.Generator().manual_seed(pair_seed(seed, i)))

def write_pair(folder, i, eps, z_hr, x_hr, manifest):
    """Pair i as one safetensors file (eps, z_0, x_0 as 8-bit; the manifest in its metadata), after
    a PNG of x_0 for people; each is written under a temp name, then renamed, so none is partial."""
    from safetensors.torch import save_file
    name, tmp = os.path.join(folder, f"pair-{i:06d}"), os.path.join(folder, f".tmp-pair-{i:06d}")
    common.save_image(x_hr, tmp + ".png")
    os.replace(tmp + ".png", name + ".png")
    x8 = x_hr.clamp(0, 1).mul(255).round().to(torch.uint8)
    save_file({"eps": eps[0].float().cpu().contiguous(), "z_0": z_hr[0].float().cpu().contiguous(),
               "x_0": x8[0].cpu().contiguous()}, tmp + ".safetensors", metadata={"manifest": json.dumps(manifest)})
    os.replace(tmp + ".safetensors", name + ".safetensors")

def pair_manifest(cfg):
    return {"preset": cfg.model, "pair_size": cfg.pair_size, "teacher_steps": cfg.teacher_steps,
            "guidance": cfg.guidance, "seed": cfg.seed, **({"pairs_from": cfg.pairs_from} if cfg.pairs_from else {})}

def pair_damage(path):
    """Why a pair file cannot be read, or None: its safetensors header (8-byte length, JSON) must
    parse and name eps, z_0 and x_0, and the data it describes must fill the file exactly."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            return f"header of {n} bytes in a file of {size}"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "its header is not JSON"
    if not {"eps", "z_0", "x_0"} <= set(header):
        return "it holds no eps, z_0 and x_0"
    end = 8 + n + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    return None if end == size else f"truncated: {size} of {end} bytes"

def damaged_pairs(folder):
    """[(file, why)] of what cannot be read in a pairs folder: the manifest, each pair file."""
    man_file = os.path.join(folder, "pairs.json")
    damaged = os.path.exists(man_file) and common.read_json(man_file) is None
    bad = [("pairs.json", "not a JSON manifest")] if damaged else []
    for f in sorted(glob.glob(os.path.join(folder, "pair-*.safetensors"))):
        why = pair_damage(f)
        if why:
            bad.append((os.path.basename(f), why))
    return bad

def check_pairs(cfg):
    """Stop a training run before anything is built where --data holds a damaged pair or manifest,
    with the command that makes exactly those again."""
    bad = damaged_pairs(cfg.data)
    if bad:
        n = len(glob.glob(os.path.join(cfg.data, "pair-*.safetensors")))
        raise SystemExit(f"{cfg.data}: {len(bad)} damaged:\n" + "".join(f"  - {f}: {why}\n" for f, why in bad) +
                         f"make exactly these again (the settings they were made with, as for the others):\n  python "
                         f"fluxsr.py --model {cfg.model} --make_pairs {n} --data {cfg.data}")

def pairs_to_write(cfg, rank, world):
    """(the pairs this rank still has to write, how many are its own): pair i is rank i % world's,
    and one on disk and readable is done. The manifest is written first where it is new or damaged;
    pairs made with other settings stop the run."""
    os.makedirs(cfg.data, exist_ok=True)
    man_file, manifest = os.path.join(cfg.data, "pairs.json"), pair_manifest(cfg)
    if rank == 0 and common.read_json(man_file) is None:  # new or damaged; each pair has its own
        with open(man_file + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(man_file + ".tmp", man_file)
    if world > 1:
        dist.barrier()
    files = {i: os.path.join(cfg.data, f"pair-{i:06d}.safetensors") for i in range(rank, cfg.make_pairs, world)}
    good = [i for i, f in files.items() if os.path.exists(f) and not pair_damage(f)]
    from safetensors import safe_open
    metas = [(safe_open(files[i], "pt").metadata() or {}).get("manifest", "null") for i in good]
    made = {json.dumps(json.loads(m)) for m in metas} - {"null"}
    if common.read_json(man_file) != manifest or made - {json.dumps(manifest)}:
        raise SystemExit(f"{cfg.data} holds pairs made with other settings ({man_file}); use a new --data")
    return [i for i in files if i not in good], len(files)

def teacher_pairs(dit, vae, cond, photos, idx, cfg, device):
    """(eps, z_hr, x_hr) of pairs idx, in one teacher call: stored noise eps to the teacher's latent
    and image (the paper's), or with --pairs_from a photo back to its eps on the teacher's flow."""
    h = cfg.pair_size // 8
    with common.autocast(device):
        if photos is None:
            eps = torch.cat([pair_noise(cfg.seed, i, (1, vae.config.latent_channels, h, h)) for i in idx])
            z_hr = teacher_sample(dit, eps.to(device), cond, cfg.teacher_steps, cfg.guidance)
            x_hr = common.decode(vae, "flux1", z_hr).clamp(0, 1)
        else:
            x_hr = torch.stack([photos[(i % len(photos), pair_seed(cfg.seed, i))] for i in idx]).to(device)
            z_hr = common.encode(vae, "flux1", x_hr)
            eps = teacher_sample(dit, z_hr, cond, cfg.teacher_steps, cfg.guidance, invert=True)
    return eps, z_hr, x_hr

def make_pairs(cfg):
    """Sample the frozen teacher from stored noise; pair i on rank i % world. Readable pairs already
    on disk are skipped: a killed run continues where it stopped; damaged ones are made again."""
    cfg = resolve(cfg)
    common.check_weights(cfg, [common.base_weights(cfg, text=True)])  # before anything is written
    rank, world, device = common.compute_init(cfg.seed)
    common.prepare_base(cfg.model)  # a mini base is pretrained first: it is the teacher
    todo, n_own = pairs_to_write(cfg, rank, world)
    manifest = pair_manifest(cfg)
    dtype = common.weight_dtype(device)
    dit = common.load_dit(cfg.model, cfg.model_path or None, dtype).to(device).requires_grad_(False).eval()
    vae = common.load_vae(cfg.model, cfg.model_path or None, dtype, device)
    cond = common.fixed_prompt(cfg, dit, device, cfg.data)
    photos = ImageDataset(cfg.pairs_from, cfg.pair_size, cfg.data_root) if cfg.pairs_from else None
    print(f"rank {rank}: {len(todo)} of {n_own} pairs to write", flush=True)
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc="pairs", disable=rank != 0)
    for k in range(0, len(todo), cfg.pair_batch):
        idx = todo[k:k + cfg.pair_batch]
        eps, z_hr, x_hr = teacher_pairs(dit, vae, cond, photos, idx, cfg, device)
        for j, i in enumerate(idx):
            write_pair(cfg.data, i, eps[j:j + 1], z_hr[j:j + 1], x_hr[j:j + 1], manifest)
        bar.update(len(idx))
    bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        print(f"{len(glob.glob(os.path.join(cfg.data, 'pair-*.safetensors')))} pairs in {cfg.data}", flush=True)

class PairDataset(torch.utils.data.Dataset):
    """Teacher pairs (eps, z_hr, x_hr). Items are keyed by (index, seed) like degrade.ImageDataset,
    so a crop is a pure function of the data position (exact resume, any number of ranks)."""

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
        eps, z_hr, x_hr = p["eps"], p["z_0"], p["x_0"].float() / 255
        size, c = x_hr.shape[-1], self.crop
        if c < size:  # aligned crop: pixel offsets on the 16-px token grid, latents at 1/8
            g = torch.Generator().manual_seed(seed)
            top, left = (16 * torch.randint(0, (size - c) // 16 + 1, (2,), generator=g)).tolist()
            x_hr = x_hr[:, top:top + c, left:left + c]
            eps, z_hr = (z[:, top // 8:(top + c) // 8, left // 8:(left + c) // 8] for z in (eps, z_hr))
        return eps, z_hr, x_hr

def open_pairs(cfg):
    """PairDataset(--data), its manifest checked: pairs of the base trained, at least --crop px."""
    man = common.read_json(os.path.join(cfg.data, "pairs.json"))
    if man and (man["preset"] != cfg.model or man["pair_size"] < cfg.crop):
        raise SystemExit(f"pairs in {cfg.data} are {man['preset']} at {man['pair_size']} px; training {cfg.model} "
                         f"with crop {cfg.crop} needs pairs from the same base, at least crop px")
    return PairDataset(cfg.data, cfg.crop)

# ------------------------------------------------------------ training
def train(cfg):
    """--make_pairs N: write the teacher pairs and stop; else Algorithm 1 on the pairs in --data."""
    cfg = resolve(cfg)
    if cfg.make_pairs:
        return make_pairs(cfg)
    check_pairs(cfg)
    rank, world, device, log = common.setup(cfg, pretrained(cfg))
    ds = open_pairs(cfg)  # before the models: missing or mismatched pairs fail fast

    # 1. models (Alg. 1 line 3): v_theta (the base + a LoRA) and the frozen VAE; no teacher
    dit, vae = build_generator(cfg, device)
    common.checkpointing(cfg, device, dit, vae)  # the VAE too: line 14's backward at 1024 px
    if cfg.fsdp:
        dit = common.shard_fsdp2(dit, log)
    feats = BlockFeatures(dit)
    random_nets = common.PRESETS[cfg.model].hub is None
    lpips = common.load_lpips(device, "random" if random_nets else cfg.lpips_weights) if cfg.w_tv_lpips else None
    cond = common.fixed_prompt(cfg, dit, device, cfg.out_dir)
    cond2 = common.expand_cond(cond, 2 * cfg.micro_batch)

    # 2. optimizer on the LoRA, gradient clipping
    params = common.trainable(dit)
    opts = {"opt": torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)}
    log(f"{cfg.model}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters")

    # 3. resume; 4. the loader of teacher pairs, data position = step
    models = {"dit": dit}
    step, _ = common.resume(cfg.out_dir, models, opts, log)
    if step == 0 and cfg.zero_init:  # v = 0: the first step returns z_lr, bicubic (ours: the mini)
        common.zero_output(dit)
    loader, accum = make_loader(ds, cfg, rank, world, step)
    log(f"{len(ds)} teacher pairs, batch {cfg.batch_size} = {world} ranks x {accum} accum x {cfg.micro_batch}")

    # 5. loop (Alg. 1 lines 4-21): each micro-batch seeded by its place in the run (a resume or any
    # number of ranks draws the same numbers); the optimizer step is line 20
    scale = 1 / accum
    saved = {"cond": {k: v.detach().cpu() for k, v in cond.items()}}  # the prompt the sampler uses
    import eval  # the held-out scores: --val_every, and --eval_heldout at the end
    val = eval.validation("fluxsr", build_sampler, cfg, device) if rank == 0 and cfg.val_every else None
    ema = common.start_ema(cfg, models)
    log.start_clock()
    while step < cfg.max_steps:
        sums = {}
        for j in range(accum):
            torch.manual_seed(common.micro_batch_seed(cfg.seed, step + 1, rank * accum + j))
            eps, z_hr, x_hr = (x.to(device, non_blocking=True) for x in next(loader))
            loss, terms, (x_lr, x_sr) = fluxsr_losses(dit, vae, lpips, feats, cond2, eps, z_hr, x_hr, cfg)
            (loss * scale).backward()
            sums = {k: sums.get(k, 0) + v.detach() / accum for k, v in terms.items()}
        common.set_lr(opts.values(), step + 1, cfg.max_steps, cfg.lr_decay)
        norms = common.optimizer_step(opts.values(), cfg.grad_clip)
        if ema:
            ema.update()
        step += 1
        log.step(step, cfg.max_steps, sums, cfg.log_every, opts, norms)
        if log.master and common.due(step, cfg.grid_every, cfg.max_steps):
            log.image("grid", common.save_grid(cfg.out_dir, step, x_lr, x_sr, x_hr), step)
        if common.due(step, cfg.save_every, cfg.max_steps):
            common.save_checkpoint(cfg.out_dir, step, cfg, models, opts, saved, ema=ema)
        if cfg.val_every and step % cfg.val_every == 0:
            common.validate(cfg, step, models, saved, ema, val, log)
    if log.master:
        common.plot_curves(cfg.out_dir)
    if rank == 0 and cfg.eval_heldout:
        eval.heldout("fluxsr", build_sampler, cfg.out_dir, cfg.degrade, cfg.data_root)

if __name__ == "__main__":
    cfg = common.parse_config(Config)
    if cfg.sample:
        common.sample_files(build_sampler(cfg), cfg.input, cfg.output)
    else:
        train(cfg)
    common.cleanup()
