"""
TEASR: Training-Efficient Any-Step Diffusion Transformer for Real-World Image Super-Resolution
(Gao, Zhu, Fang, Hu, Zhang; arXiv:2606.16188). The authors released no code: this file is a
from-the-paper implementation. Every step is written out here; nothing is taken from another project.

One model, no teacher, no discriminator: a dual-branch DiT on Qwen-Image-2512 is trained with
Self-Adversarial Distillation (SAD). The noise branch is the frozen base; a LoRA that acts only on the
condition (LR) tokens, plus a second timestep embedder, is all that trains. The same network gives
the real trajectory (target time t_tar >= 0), the one-step generator (t = 1 -> t_tar = 0) and the
fake trajectory (negative target time), so one model in memory plays teacher, student and fake score.

Notation (rectified flow, t = 1 is noise): z_t = (1 - t) z_0 + t eps, v = eps - z_0, Euler step
z_s = z_t - (t - s) v. z_0 = z_hr the HR latent, z_lr (the paper's z_lq) the latent of the bicubic x4 LR.
v(z, t, t_tar) = v_theta(z, t, z_lr, t_tar): noise tokens at the current time t, condition tokens at
the target time t_tar (Decoupled Timestep Condition, Sec. 3.3).
    (1)  v1 = v(z_t, t, s)                                      one shortcut step t -> s
    (2)  z_m = z_t - (t - s)/2 v(z_t, t, m),   m = (t + s)/2
    (3)  v2 = 1/2 v(z_t, t, m) + 1/2 v(z_m, m, s)               two half steps
    (4)  L_cons = || v1 - sg(v2) ||^2
         L_flow = || v(z_t, t, t) - (eps - z_0) ||^2             instantaneous velocity: t_tar = t
    (5)  L_base = L_flow + lambda_cons L_cons
    (6)  z_fake = eps - v(eps, 1, 0)                            one-step estimate from pure noise
    (7)  z'_fake = t' eps_fake + (1 - t') sg(z_fake),   t' ~ U(0, 1)
    (8)  L_adv = || v(z'_fake, t', -t') - (eps_fake - sg(z_fake)) ||^2    fake trajectory, t_tar = -t'
    (9)  z_s = s eps_rect + (1 - s) sg(z_fake),   s ~ U(0, 1)
    (10) Delta = v(z_s, s, -s) - v(z_s, s, s)                    fake score minus real score
    (14) Delta <- w(s) Delta,   w(s) = (1 - s)^2 / s             Time-Aware Rectification
    (11) L_rectify = || v(eps, 1, 0) - sg(v(eps, 1, 0) - Delta) ||^2      (t = 1, t_tar = 0: z_t = eps)
    (12) x_fake = D(z_fake)
    (13) L_data = MSE(x_fake, x_hr) + lambda_lpips LPIPS(x_fake, x_hr)
    L = L_base + lambda_data L_data + lambda_adv L_adv + lambda_rect L_rectify
    Algorithm 1 (any-step): tau_i = 1 - i/N, z <- z - (tau_i - tau_i+1) v(z, tau_i, tau_i+1), N = 1..30.
Eq. (11)'s gradient is 2 w(s) Delta / numel on v(eps, 1, 0): it moves z_fake = eps - v by +w Delta,
towards the real score's x0 and away from the fake score's (DMD). In Eq. (11) t = 1, so z_t is the
noise of Eq. (6) and v(z_t, 1, 0) is the very forward that made z_fake: it runs once per step.

Launch:
    python teasr.py --data LSDIR_FFHQ10k.txt                  # one GPU: batch 4 = 4 x accumulation
    torchrun --nproc_per_node=2 teasr.py --data LSDIR_FFHQ10k.txt   # Sec. 4.1: 2 GPUs x 1 x accum 2
    python teasr.py --sample --ckpt out/teasr --input lr/ --output sr/ --steps 1    # or 2, 4, 8, 30
    python teasr.py --model tiny --max_steps 20               # CPU smoke run (random tiny Qwen-Image)
    python teasr.py --model mini                              # CPU, the pretrained mini base, table vs bicubic
    python teasr.py --fused_t   /   --const_weight            # the two ablations of Table 3

What differs from the paper, and why:
- Unknown in the paper, chosen here (`# ours` in Config): the loss weights (0.25 for each auxiliary
  term as the authors' precursor, 1.0 for L_data and LPIPS), the time laws of L_flow (t ~ U(0,1)) and
  L_cons (t ~ U(0,1), s ~ U(0,t)), the guard of w(s) near s = 0 (the denominator is clamped at
  tar_min_s), the LoRA targets and init, the tile size.
- ||.||_2 in Eqs. (4), (8), (11) is taken as the mean squared error, as in flow matching.
- sg on the consistency target v2 (Eq. 4): the shortcut-model practice; the paper does not say.
- LoRA targets: the patch embedding and every image-stream linear of the blocks (q, k, v, out, MLP),
  applied to the condition half of the tokens only (OminiControl). Not peft: peft would apply the
  delta to all tokens, so a small forward hook (CondLoRA) does it. In the last block only k and v get
  one (its condition queries, outputs and MLP never reach the velocity). The condition tokens' adaLN
  modulation comes from the trainable t_tar embedder instead of a LoRA on img_mod.
- --fused_t (Table 3 baseline): temb(t) + temb2(t_tar) for all tokens, temb2 zero-initialised so
  the model starts as the base; the paper names this fusion but not which one its baseline used.
- Each loss group is back-propagated as soon as it is computed (same gradient as one backward of
  the sum): at most one DiT graph alive at a time (plus the decoder's and LPIPS' for L_data).
- diffusers' Qwen-Image VAE decoder clamps to [-1, 1], so saturated pixels give L_data no gradient.
- No --fsdp: the paper's point is that this fits one GPU (bf16 frozen base + LoRA + checkpointing).
- --train_noise (ours, off by default; the mini's setting): the base's own weights train too, in fp32,
  so the noise branch is no longer frozen. On the 2M mini base the frozen noise branch cannot read
  the condition tokens (README, mini): trained alone, the condition LoRA cannot even copy the LR latent
  into the one-step output (19 dB). The checkpoint then also holds the base (`dit.safetensors`).
"""
import copy, dataclasses, json, os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from degrade import PRESETS as DEGRADE, degrade

DEFAULT_MODEL = "qwen-image"
FAMILY = "qwen"
# image-stream linears of every block: they see the [noise | condition] token sequence
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.0.proj", "img_mlp.net.2")
LAST_TARGETS = ("attn.to_k", "attn.to_v")  # the last block's condition outputs are never read: only its keys/values act


# --------------------------------------------------------------------------- config
@dataclasses.dataclass
class Config:
    model: str = DEFAULT_MODEL    # Sec. 4.1: Qwen-Image-2512; --model tiny -> tiny-qwen
    model_path: str = ""          # local folder of the base (default: the hub id)
    data: str = "sample"          # Sec. 4.1: LSDIR + first 10k FFHQ (folder or file list); sample = offline photos
    data_root: str = "data"
    degrade: str = "realesrgan"   # LR of training and eval: a degrade.PRESETS name (paper: Real-ESRGAN); mini: bicubic (ours)
    out_dir: str = "out/teasr"
    lora_rank: int = 128          # Sec. 4.1: LoRA on the condition branch, rank 128
    lora_alpha: float = 128.0     # Sec. 4.1: alpha 128
    lr: float = 5e-5              # Sec. 4.1: AdamW, constant
    lr_decay: float = 0.0         # ours: lr x half cosine to 0 over this last fraction of the steps; 0: constant
    beta2: float = 0.99           # Sec. 4.1: betas (0.9, 0.99), weight decay 0
    grad_clip: float = 1.0        # Sec. 4.1
    lambda_cons: float = 0.25     # ours (Eq. 5): 0.25 per auxiliary term, as the authors' precursor
    lambda_data: float = 1.0      # ours: L_data (Eq. 13) is the anchor of the one-step estimate
    lambda_lpips: float = 1.0     # ours (Eq. 13)
    lambda_adv: float = 0.25      # ours (Eq. 8): precursor
    lambda_rect: float = 0.25     # ours (Eq. 11): precursor
    tar_min_s: float = 0.05       # ours: w(s) = (1 - s)^2 / max(s, tar_min_s); Eq. 14 is infinite at s = 0
    const_weight: bool = False    # Table 3 ablation: w(s) = 1 instead of TAR (Eq. 14)
    fused_t: bool = False         # Table 3 ablation: temb(t) + temb2(t_tar) for all tokens instead of DTC
    prompt: str = ""              # Sec. 4.1: empty prompt
    max_steps: int = 47000        # Sec. 4.1: ~47k steps
    batch_size: int = 4           # Sec. 4.1: 1 per GPU x 2 GPUs x 2 accumulation
    micro_batch: int = 1          # Sec. 4.1
    crop: int = 512               # REFERENCE conventions: 512 HR crops (SMFSR/TEASR)
    seed: int = 0
    log_every: int = 10
    save_every: int = 1000
    grid_every: int = 500
    num_workers: int = 2
    grad_ckpt: bool = True        # gradient checkpointing of the DiT blocks (GPU only)
    fsdp: bool = False            # shared field; not supported here (one GPU is the paper's point)
    sample: bool = False          # --sample mode
    ckpt: str = ""                # checkpoint folder or out_dir (latest ckpt-*) to sample from
    input: str = ""               # LR image or folder
    output: str = "out/teasr/sr"
    steps: int = 1                # Algorithm 1: any N; the paper reports 1, 2, 4, 8, 30 (Table 2)
    tile: int = 128               # ours: latent tile, 1024 px
    overlap: int = 32             # ours: 256 px
    eval_heldout: bool = False    # ours: at the end, eval.py on the held-out sample photos vs bicubic (mini: on)
    train_noise: bool = False     # Sec. 4.1: the noise branch is frozen; True (ours, the mini): the base trains too


# --model tiny: small sizes unless the flag was given (values equal to the default are replaced)
TINY = dict(max_steps=20, crop=64, lora_rank=8, lora_alpha=8.0, batch_size=2, tile=8, overlap=2)
# --model mini (ours): a ~22-minute CPU run on the pretrained mini base (README, "mini"), each choice
# measured there. train_noise: the frozen 2M noise branch cannot read the condition tokens. lambda_data
# 30: the pixel MSE (~0.005) against latent flow terms (~1). lr_decay 0.5: at a constant lr the result
# swings +-0.3 dB between checkpoints, below bicubic. lambda_lpips 0: offline the VGG is random, not a
# perceptual loss, and was over half of a CPU step. tile 16 = the training crop's latent size.
MINI = dict(max_steps=1200, crop=128, lora_rank=32, lora_alpha=32.0, lr=3e-3, lr_decay=0.5, lambda_data=30.0,
            lambda_lpips=0.0, batch_size=4, tile=16, overlap=4, grid_every=100, save_every=100, eval_heldout=True,
            degrade="bicubic", train_noise=True)


def resolve(cfg):
    """Preset name, with the tiny overrides applied and the settings checked."""
    preset = common.resolve_preset(cfg.model, DEFAULT_MODEL)
    if common.PRESETS[preset].family != FAMILY:
        raise SystemExit(f"--model {cfg.model}: TEASR is built on Qwen-Image (dual-stream blocks with per-token modulation)")
    common.small_defaults(cfg, preset, TINY, MINI)
    common.check_degrade(cfg.degrade)
    if cfg.crop % 16:
        raise SystemExit(f"--crop {cfg.crop}: expected a multiple of 16")
    if cfg.tile % 2 or cfg.overlap % 2 or not 2 <= cfg.overlap <= cfg.tile // 2:
        raise SystemExit(f"--tile {cfg.tile} --overlap {cfg.overlap}: expected even, 2 <= overlap <= tile / 2")
    if cfg.fsdp:
        raise SystemExit("--fsdp: not supported by teasr.py; the paper trains the 20B base on one GPU "
                         "(frozen bf16 base, LoRA on the condition branch, gradient checkpointing)")
    return preset


def empty_prompt(preset, cfg, dit, device, cache_dir, rank):
    """The paper's empty prompt, encoded once (rank 0 first, the others read its cache). An all-ones
    mask is dropped, so attention runs unmasked (the fast kernels)."""
    if common.PRESETS[preset].hub is None and not cfg.model_path:
        cond = common.tiny_cond(dit, FAMILY)
    else:
        ddp = dist.is_initialized()
        if rank == 0 or not ddp:
            cond = common.prompt_cond(preset, cfg.prompt, cache_dir, device, cfg.model_path or None)
        if ddp:
            dist.barrier()
        if rank != 0 and ddp:
            cond = common.prompt_cond(preset, cfg.prompt, cache_dir, device, cfg.model_path or None)
    cond = {k: v.to(device) for k, v in cond.items()}
    if "mask" in cond and bool(cond["mask"].bool().all()):
        del cond["mask"]
    return cond


# --------------------------------------------------------------------------- dual-branch DiT
class CondLoRA(nn.Module):
    """LoRA on the condition tokens only (OminiControl): a forward hook on a frozen Linear whose input
    is the token sequence [noise | condition] (equal halves). The noise half keeps the base output
    bit for bit; the condition half gets + alpha/rank * up(down(x))."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.down = nn.Linear(base.in_features, rank, bias=False)  # kaiming-uniform, as peft's default
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.up.weight)  # delta 0 at init: the model starts as the base
        self.scale = alpha / rank

    def forward(self, module, args, y):  # hook signature: y = module(*args)
        x = args[0]
        n = x.shape[1] // 2
        y[:, n:] += self.scale * self.up(self.down(x[:, n:]))  # (B, n, D_out), condition half only
        return y


class CondBranch(nn.Module):
    """Everything TEASR trains, outside the frozen base (whose state dict stays untouched): the
    condition-token LoRA of every target Linear, and the t_tar embedder (a copy of the base's
    timestep MLP, Sec. 3.3; zero-initialised and summed in for --fused_t)."""

    def __init__(self, dit, rank, alpha, fused_t=False):
        super().__init__()
        self.fused_t = fused_t
        if dit.config.use_additional_t_cond:
            raise SystemExit("TEASR: a base with additional_t_cond (Qwen-Image-Layered) is not supported")
        dit.requires_grad_(False)  # the noise branch is the frozen base
        mods = dict(dit.named_modules())
        last = len(dit.transformer_blocks) - 1
        names = ["img_in"] + [f"transformer_blocks.{i}.{t}" for i in range(last + 1)
                              for t in (LAST_TARGETS if i == last else LORA_TARGETS)]
        self.lora = nn.ModuleDict({k.replace(".", "_"): CondLoRA(mods[k], rank, alpha) for k in names})
        self.t_embedder = copy.deepcopy(dit.time_text_embed.timestep_embedder).float()
        if fused_t:
            nn.init.zeros_(self.t_embedder.linear_2.weight)
            nn.init.zeros_(self.t_embedder.linear_2.bias)
        self.requires_grad_(True)
        self.handles = [mods[k].register_forward_hook(self.lora[k.replace(".", "_")]) for k in names]


def v_theta(dit, branch, z_t, t, z_lr, t_tar, cond):
    """Dual-branch velocity v_theta(z_t, t, z_lr, t_tar) -> (B, C, H, W), v = eps - z_0 (Fig. 2).
    z_t, z_lr (B, C, H, W); t, t_tar (B,). The base's own modules run in the base's order (as
    QwenImageTransformer2DModel.forward); what differs: the LR tokens join the image sequence at the same
    positions, and each token group has its own time embedding. branch=None: the frozen base alone."""
    B, C, H, W = z_t.shape
    n = H * W // 4  # tokens per group (2x2 packing)
    # tokens [noise | condition]: the LR latent through the same patch embedding (its LoRA: condition half)
    x = dit.img_in(torch.cat([common.pack(z_t), common.pack(z_lr)], 1).to(dit.dtype))  # (B, 2n, D)
    # DTC: noise tokens modulated by temb(t), condition tokens by temb2(t_tar)
    proj = dit.time_text_embed.time_proj  # sinusoids of 1000 t (no parameters)
    temb_t = dit.time_text_embed.timestep_embedder(proj(t).to(x.dtype))  # (B, D)
    embed_tar = branch.t_embedder if branch is not None else dit.time_text_embed.timestep_embedder
    temb_tar = embed_tar(proj(t_tar).to(x.dtype))  # (B, D)
    if branch is not None and branch.fused_t:  # ablation: temb1(t_cur) + temb2(t_tar), the same for every token
        temb_t = temb_tar = temb_t + temb_tar
    temb = torch.cat([temb_t, temb_tar])  # (2B, D): rows of the noise group, then of the condition group
    index = (torch.arange(2 * n, device=x.device) >= n).int().expand(B, -1)  # (B, 2n): 0 noise, 1 condition
    txt = dit.txt_in(dit.txt_norm(cond["embeds"].to(dit.dtype).expand(B, -1, -1)))  # (B, L, D)
    mask = cond["mask"].bool().expand(B, -1) if "mask" in cond else None
    img_freqs, txt_freqs = dit.pos_embed([(1, H // 2, W // 2)], device=x.device, max_txt_seq_len=txt.shape[1])
    rope = (torch.cat([img_freqs, img_freqs]), txt_freqs)  # both groups at the same positions (OminiControl)
    for block in dit.transformer_blocks:
        block.zero_cond_t = True  # diffusers' switch: temb has two halves picked per token by index; text takes the first
        args = (x, txt, mask, temb, rope, None, index)
        if torch.is_grad_enabled() and dit.gradient_checkpointing:
            txt, x = dit._gradient_checkpointing_func(block, *args)
        else:
            txt, x = block(*args)
    x = dit.norm_out(x[:, :n], temb_t)  # the velocity is read from the noise tokens
    return common.unpack(dit.proj_out(x).float(), H, W)


def bind(dit, branch, z_lr, cond):
    """v(z, t, t_tar) for this batch's LR latent; z may stack k copies of the batch (one batched forward)."""
    def v(z, t, t_tar):
        return v_theta(dit, branch, z, t, z_lr.repeat(z.shape[0] // z_lr.shape[0], 1, 1, 1), t_tar, cond)
    return v


# --------------------------------------------------------------------------- losses
def _bc(t):  # (B,) -> (B, 1, 1, 1)
    return t.view(-1, 1, 1, 1)


def flow_loss(v, z_0, t, eps):
    """L_flow (Eq. 5): instantaneous velocity on the real trajectory, target time = current time."""
    z_t = (1 - _bc(t)) * z_0 + _bc(t) * eps
    return F.mse_loss(v(z_t, t, t), eps - z_0)              # Eq. (5), L_flow


def consistency_loss(v, z_0, t, s, eps):
    """L_cons (Eqs. 1-4): one shortcut step t -> s against two half steps through the midpoint m."""
    z_t = (1 - _bc(t)) * z_0 + _bc(t) * eps
    m = (t + s) / 2
    with torch.no_grad():  # paper != code: the paper does not write sg on v2; shortcut models do
        v_tm = v(z_t, t, m)
        z_m = z_t - _bc(t - s) / 2 * v_tm                    # Eq. (2)
        v2 = 0.5 * v_tm + 0.5 * v(z_m, m, s)                 # Eq. (3)
    v1 = v(z_t, t, s)                                        # Eq. (1)
    return F.mse_loss(v1, v2)                                # Eq. (4)


def fake_estimate(v, eps):
    """Eq. (6): z_fake = eps - v(eps, 1, z_lr, 0); returns (z_fake, v_gen), v_gen carrying the graph."""
    ones = torch.ones(eps.shape[0], device=eps.device)
    v_gen = v(eps, ones, 0 * ones)
    return eps - v_gen, v_gen                                # Eq. (6)


def data_loss(vae, lpips, z_fake, x_hr, lambda_lpips):
    """L_data (Eqs. 12-13) on the decoded one-step estimate; returns (L_data, mse, lpips, x_fake)."""
    x_fake = common.decode(vae, FAMILY, z_fake)              # Eq. (12)
    mse = F.mse_loss(x_fake, x_hr)
    lp = lpips(x_fake, x_hr) if lambda_lpips else mse.new_zeros(())  # 0: no VGG pass at all
    return mse + lambda_lpips * lp, mse, lp, x_fake          # Eq. (13)


def adv_loss(v, z_fake, t, eps_fake):
    """L_adv (Eqs. 7-8): flow matching on the fake trajectory of sg(z_fake), target time -t'."""
    z_fake = z_fake.detach()                                 # sg in Eqs. (7) and (8)
    z_t = _bc(t) * eps_fake + (1 - _bc(t)) * z_fake          # Eq. (7)
    return F.mse_loss(v(z_t, t, -t), eps_fake - z_fake)      # Eq. (8)


def tar_weight(s, min_s=0.05, const=False):
    """Eq. (14): w(s) = (1 - s)^2 / s, the denominator clamped at min_s (w(0) = 1/min_s, finite);
    const: the ablation's w = 1."""
    return torch.ones_like(s) if const else (1 - s) ** 2 / s.clamp_min(min_s)


def rectify_loss(v, v_gen, z_fake, s, eps_rect, min_s=0.05, const=False):
    """L_rectify (Eqs. 9-11, TAR Eq. 14): v_gen = v(eps, 1, 0) (the forward of Eq. 6) is pulled by
    -w(s) Delta, Delta = fake score - real score at the re-noised estimate; Delta carries no gradient."""
    z_s = _bc(s) * eps_rect + (1 - _bc(s)) * z_fake.detach()                     # Eq. (9)
    with torch.no_grad():  # sg of Eq. (11): both scores in one batched forward
        v_fake, v_real = v(torch.cat([z_s, z_s]), torch.cat([s, s]), torch.cat([-s, s])).chunk(2)
        delta = _bc(tar_weight(s, min_s, const)) * (v_fake - v_real)             # Eqs. (10), (14)
    return F.mse_loss(v_gen, v_gen.detach() - delta)                            # Eq. (11)


# --------------------------------------------------------------------------- sampler
def any_step_sample(v, eps, steps):
    """Algorithm 1: N Euler steps on tau_i = 1 - i/N from z = eps; the noise branch sees tau_i, the
    condition branch tau_{i+1}, where the step lands."""
    tau = torch.linspace(1, 0, steps + 1, device=eps.device)
    z, ones = eps, torch.ones(eps.shape[0], device=eps.device)
    for i in range(steps):
        z = z - (tau[i] - tau[i + 1]) * v(z, tau[i] * ones, tau[i + 1] * ones)  # Delta tau = 1/N
    return z


def build_sampler(ckpt, device="cpu", steps=1, seed=0, tile=None, overlap=None):
    """fn(x_lr (1, 3, h, w) in [0, 1]) -> (1, 3, 4h, 4w): bicubic x4, encode, N steps of Algorithm 1
    from seeded noise (each step's velocity over overlapping latent tiles), decode."""
    if steps < 1:
        raise SystemExit(f"--steps {steps}: expected N >= 1 (the paper samples 1 to 30 steps)")
    found, cfg = common.checkpoint_config(ckpt, Config)
    preset, device = resolve(cfg), torch.device(device)
    tile, overlap = tile or cfg.tile, overlap or cfg.overlap
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dit = common.load_dit(preset, cfg.model_path or None, dtype).requires_grad_(False).eval()
    with torch.random.fork_rng(devices=[]):  # the LoRA init is overwritten; keep the caller's RNG as it was
        branch = CondBranch(dit, cfg.lora_rank, cfg.lora_alpha, cfg.fused_t)
    state = common.load_checkpoint(found, {"cond_branch": branch, "dit": dit}, restore_rng=False)  # dit: --train_noise
    dit, branch = dit.to(device), branch.to(device).eval()
    vae = common.load_vae(preset, cfg.model_path or None, dtype).to(device)
    if common.PRESETS[preset].hub is not None:
        vae.enable_tiling()  # full-resolution encode/decode of large images
    cond = {k: v.to(device) for k, v in state["cond"].items()}

    def latent(z_lr):
        eps = torch.randn(z_lr.shape, generator=torch.Generator().manual_seed(seed)).to(device)
        v = lambda z, t, t_tar: common.tiled_pair(lambda zz, ll: v_theta(dit, branch, zz, t, ll, t_tar, cond),
                                                  z, z_lr, tile, overlap)
        return any_step_sample(v, eps, steps)
    return lambda x_lr: common.super_resolve(vae, FAMILY, x_lr, latent)


# --------------------------------------------------------------------------- training
def train(cfg):
    ddp, rank, local_rank, world, device = common.compute_init(cfg.seed)
    preset = resolve(cfg)
    log = common.Logger(cfg.out_dir, rank == 0)
    log(json.dumps(dataclasses.asdict(cfg)))

    # 1. models: one DiT in memory, frozen base in bf16 on GPU; trainable: condition LoRA + t_tar embedder
    #    (--train_noise: and the base itself, in fp32)
    dtype = torch.bfloat16 if device.type == "cuda" and not cfg.train_noise else torch.float32
    dit = common.load_dit(preset, cfg.model_path or None, dtype).requires_grad_(False).eval()
    with torch.random.fork_rng(devices=[]):  # the same init on every rank
        torch.manual_seed(cfg.seed)
        branch = CondBranch(dit, cfg.lora_rank, cfg.lora_alpha, cfg.fused_t)
        lpips = common.load_lpips(device, pretrained=not common.is_tiny(preset)) if cfg.lambda_lpips else None  # offline: seed-0 random VGG
    cond = empty_prompt(preset, cfg, dit, device, cfg.out_dir, rank)  # text encoder on the GPU before the DiT, not with it
    dit, branch = dit.to(device), branch.to(device).train()
    vae = common.load_vae(preset, cfg.model_path or None, dtype).to(device)
    if cfg.grad_ckpt and device.type == "cuda":
        dit.enable_gradient_checkpointing()
    amp = lambda: common.autocast(device)

    # 2. optimizer on the condition branch only (--train_noise: and the base), grad clip
    params = list(branch.parameters()) + (list(dit.requires_grad_(True).parameters()) if cfg.train_noise else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=0.0)
    log(f"{preset}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters (condition LoRA + t_tar embedder"
        + (" + the base)" if cfg.train_noise else f"), {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M frozen"))
    models = {"cond_branch": branch, "dit": dit}  # a frozen dit saves nothing (common._trainable_state)

    # 3. resume
    g = torch.Generator(device).manual_seed(1_000_003 + cfg.seed * world + rank)  # degradations
    start_step, ckpt = 0, common.latest_checkpoint(cfg.out_dir)
    if ckpt:
        start_step = common.load_checkpoint(ckpt, models, {"opt": opt}, generators={"degrade": g})["step"]
        log(f"resumed from {ckpt} at step {start_step}")

    # 4. loader: data position = step
    if cfg.batch_size % (world * cfg.micro_batch):
        raise SystemExit(f"--batch_size {cfg.batch_size} must divide by ranks {world} x --micro_batch {cfg.micro_batch}")
    loader, accum = common.make_loader(cfg.data, cfg.crop, cfg.data_root, cfg.batch_size, cfg.micro_batch, rank,
                                       world, cfg.seed, start_step, cfg.num_workers)
    log(f"batch {cfg.batch_size} = {world} ranks x {accum} accum x {cfg.micro_batch}, crop {cfg.crop}")

    # 5. loop. Per micro-batch: 4 DiT forwards with gradient (flow, shortcut, one-step, fake trajectory)
    #    and 3 without (two for the shortcut target, one batched 2B for the two scores of Eq. 10).
    log.start()
    for step in range(start_step + 1, cfg.max_steps + 1):
        sums = {}
        for _ in range(accum):
            x = next(loader).to(device, non_blocking=True)
            with torch.no_grad():  # degradation in fp32 (outside autocast), then one encode for HR and LR
                x_lr, x_hr = degrade(x, 4, DEGRADE[cfg.degrade], generator=g)
                with amp():
                    z_hr, z_lr = common.encode(vae, FAMILY, torch.cat([x_hr, common.upsample_lr(x_lr)])).chunk(2)
            v, B = bind(dit, branch, z_lr, cond), z_hr.shape[0]
            rand = lambda: torch.rand(B, device=device)
            # real trajectory, L_base (Eq. 5); each group is back-propagated at once to free its graph
            with amp():
                l_flow = flow_loss(v, z_hr, rand(), torch.randn_like(z_hr))
            (l_flow / accum).backward()
            with amp():
                t = rand()
                l_cons = consistency_loss(v, z_hr, t, t * rand(), torch.randn_like(z_hr))  # ours: s ~ U(0, t)
            (cfg.lambda_cons * l_cons / accum).backward()
            # one-step estimate (Eq. 6): its forward feeds L_rectify (as v(z_t, 1, 0)) and L_data; the two
            # scores run before the decoder, so their forward never coexists with the decoder's graph
            with amp():
                z_fake, v_gen = fake_estimate(v, torch.randn_like(z_hr))
                l_rect = rectify_loss(v, v_gen, z_fake, rand(), torch.randn_like(z_hr), cfg.tar_min_s, cfg.const_weight)
                l_data, l_mse, l_lpips, x_fake = data_loss(vae, lpips, z_fake, x_hr, cfg.lambda_lpips)
            ((cfg.lambda_data * l_data + cfg.lambda_rect * l_rect) / accum).backward()
            # fake trajectory (Eqs. 7-8) on sg(z_fake)
            with amp():
                l_adv = adv_loss(v, z_fake, rand(), torch.randn_like(z_hr))
            (cfg.lambda_adv * l_adv / accum).backward()
            total = (l_flow + cfg.lambda_cons * l_cons + cfg.lambda_data * l_data + cfg.lambda_adv * l_adv
                     + cfg.lambda_rect * l_rect)
            terms = dict(loss=total, flow=l_flow, cons=l_cons, mse=l_mse, lpips=l_lpips, adv=l_adv, rect=l_rect)
            sums = {k: sums.get(k, 0) + val.detach() / accum for k, val in terms.items()}
        common.set_lr([opt], step, cfg.max_steps, cfg.lr_decay)
        common.optimizer_step([params], [opt], cfg.grad_clip)
        log.step(step, cfg.max_steps, sums, device, cfg.log_every)
        if rank == 0 and (step % cfg.grid_every == 0 or step == cfg.max_steps):
            common.save_grid(os.path.join(cfg.out_dir, "grids", f"step-{step}.png"), x_lr, x_fake.detach().clamp(0, 1), x_hr)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            common.save_checkpoint(cfg.out_dir, step, cfg, models, {"opt": opt},
                                   extra={"cond": {k: v.detach().cpu() for k, v in cond.items()}}, generators={"degrade": g})
    if rank == 0 and cfg.eval_heldout:
        common.heldout_eval("teasr", cfg.out_dir, cfg.degrade)
    return branch


if __name__ == "__main__":
    cfg = common.parse_config(Config)
    if cfg.sample:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        common.sample_files(build_sampler(cfg.ckpt or cfg.out_dir, dev, cfg.steps, cfg.seed), cfg.input, cfg.output)
    else:
        train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
