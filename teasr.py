"""
TEASR: Training-Efficient Any-Step Diffusion Transformer for Real-World Image Super-Resolution
(Gao, Zhu, Fang, Hu, Zhang; arXiv:2606.16188). No code was released: this file implements the paper.

One model, no teacher, no discriminator: a dual-branch DiT on Qwen-Image-2512 is trained with
Self-Adversarial Distillation (SAD). The noise branch is the frozen base; a LoRA that acts only on
the condition (LR) tokens, plus a second timestep embedder, is all that trains. The same network
gives the real trajectory (target time t_tar >= 0), the one-step generator (t = 1 -> t_tar = 0) and
the fake trajectory (negative target time): one model in memory is teacher, student and fake score.

Notation (rectified flow, t = 1 is noise): z_t = (1 - t) z_hr + t eps, v = eps - z_hr, Euler step
z_s = z_t - (t - s) v; z_lr (the paper's z_lq) the latent of the bicubic x4 LR; v(z, t, t_tar) =
v_theta(z, t, z_lr, t_tar): noise tokens at the current time t, condition tokens at the target time
t_tar (Decoupled Timestep Condition, Sec. 3.3).
    (1)  v1 = v(z_t, t, s)                                      one shortcut step t -> s
    (2)  z_m = z_t - (t - s)/2 v(z_t, t, m),   m = (t + s)/2
    (3)  v2 = 1/2 v(z_t, t, m) + 1/2 v(z_m, m, s)               two half steps
    (4)  L_cons = || v1 - sg(v2) ||^2
    (5)  L_base = L_flow + lambda_cons L_cons,
         L_flow = || v(z_t, t, t) - (eps - z_hr) ||^2            instantaneous velocity: t_tar = t
    (6)  z0_hat = eps - v(eps, 1, 0)                            the one-step estimate (the paper's z_fake)
    (7)  z'_fake = t' eps_fake + (1 - t') sg(z0_hat),   t' ~ U(0, 1)
    (8)  L_adv = || v(z'_fake, t', -t') - (eps_fake - sg(z0_hat)) ||^2    fake trajectory, t_tar = -t'
    (9)  z_s = s eps_rect + (1 - s) sg(z0_hat),   s ~ U(0, 1)
    (10) Delta = v(z_s, s, -s) - v(z_s, s, s)                    fake score minus real score
    (14) Delta <- w(s) Delta,   w(s) = (1 - s)^2 / s             Time-Aware Rectification
    (11) L_rectify = || v(eps, 1, 0) - sg(v(eps, 1, 0) - Delta) ||^2      (t = 1, t_tar = 0: z_t = eps)
    (12) x_sr = D(z0_hat)
    (13) L_data = MSE(x_sr, x_hr) + lambda_lpips LPIPS(x_sr, x_hr)
    L = L_base + lambda_data L_data + lambda_adv L_adv + lambda_rect L_rectify
    Alg. 1 (any-step, N = 1..30): tau_i = 1 - i/N,  z <- z - (tau_i - tau_i+1) v(z, tau_i, tau_i+1)
Eq. (11)'s gradient is 2 w(s) Delta / numel on v(eps, 1, 0): it moves z0_hat = eps - v by +w Delta,
towards the real score's x0 and away from the fake score's (DMD). In Eq. (11) t = 1, so z_t is the
noise of Eq. (6) and v(z_t, 1, 0) is the very forward that made z0_hat: it runs once per step.

    python teasr.py --data LSDIR_FFHQ10k.txt                  # one GPU: batch 4 = 4 x accumulation
    torchrun --nproc_per_node=2 teasr.py --data LSDIR_FFHQ10k.txt   # Sec. 4.1: 2 GPUs x 1 x accum 2
    python teasr.py --sample --ckpt out/teasr --input lr/ --output sr/ --steps 1    # or 2, 4, 8, 30
    python teasr.py --model mini                              # CPU: the mini base, a table against bicubic
    python teasr.py --fused_t   /   --const_weight            # the two ablations of Table 3

What differs from the paper, and why:
- Unknown in the paper, chosen here (`# ours` in Config): the loss weights (0.25 for each auxiliary
  term as the authors' precursor, 1.0 for L_data and LPIPS), the time laws of L_flow (t ~ U(0,1))
  and L_cons (t ~ U(0,1), s ~ U(0,t)), the guard of w(s) near s = 0 (the denominator is clamped at
  tar_min_s), the LoRA targets and init, the tile size.
- ||.||_2 in Eqs. (4), (8), (11) is taken as the mean squared error, as in flow matching.
- sg on the consistency target v2 (Eq. 4): the shortcut-model practice; the paper does not say.
- LoRA targets: the patch embedding and every image-stream linear of the blocks (q, k, v, out, MLP),
  applied to the condition half of the tokens only (OminiControl). Not peft: peft would apply the
  delta to all tokens, so a small forward hook (CondLoRA) does it. In the last block only k and v
  get one (its condition queries, outputs and MLP never reach the velocity). The condition tokens'
  adaLN modulation comes from the trainable t_tar embedder instead of a LoRA on img_mod.
- --fused_t (Table 3 baseline): temb(t) + temb2(t_tar) for all tokens, temb2 zero-initialised so the
  model starts as the base; the paper names this fusion but not which one its baseline used.
- The four loss groups are back-propagated together, once per micro-batch; with gradient
  checkpointing their four DiT graphs hold only the blocks' inputs.
- diffusers' Qwen-Image VAE decoder clamps to [-1, 1], so saturated pixels give L_data no gradient.
- Pixel ranges: L_data's MSE (Eq. 13) is taken on [0, 1] images, the range of every image outside
  the VAE and of PSNR; the paper does not say. On [-1, 1] lambda_data would weigh 4x more against
  the latent terms (L_base, L_adv, L_rectify).
- --train_base full (ours, off by default; the mini's setting): the base's own weights train too, in
  fp32, so the noise branch is no longer frozen: on the 2M mini base a frozen one cannot read the
  condition tokens (README, mini bases). The checkpoint then holds the base too (dit.safetensors).
- --zero_init (ours, the mini): v = the DiT's output + (z_t - z_lr), that output layer zeroed: the
  one step from eps (Eq. 6) starts at z0_hat = z_lr, bicubic, with no eps to cancel first.
"""
import copy, dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import bc
from degrade import PRESETS as DEGRADE, ImageDataset, check_preset, degrade, make_loader

UNSUPPORTED = {"fsdp": "the paper trains the 20B base on one GPU (a frozen bf16 base, a LoRA on the condition branch, "
                       "gradient checkpointing), and the dual-branch forward calls the base's modules one by one, "
                       "which FSDP's per-module hooks do not see",
               "fuse_lora": "the condition LoRA acts on the LR tokens only, and the noise tokens run the bare base in "
                            "the same pass: no merged base computes both"}

# ------------------------------------------------------------ config
@dataclasses.dataclass
class Config(common.SampleFlags):  # + the shared sampling flags
    model: str = "qwen-image"     # Sec. 4.1: Qwen-Image-2512
    model_path: str = ""          # local folder of the base (else the preset's hub id)
    data: str = "sample"          # Sec. 4.1: LSDIR + the first 10k FFHQ (a folder or a file list)
    data_root: str = "data"       # folder of the named datasets
    degrade: str = "realesrgan"   # degrade.PRESETS name of the LR (paper: Real-ESRGAN)
    out_dir: str = "out/teasr"    # checkpoints, log.txt, grids/
    train_base: str = "none"      # Sec. 4.1: the noise branch (the base) is frozen; full: it trains too (ours, mini)
    lora_rank: int = 128          # Sec. 4.1: the condition branch's LoRA, rank 128
    lora_alpha: float = 128.0     # Sec. 4.1: alpha 128
    lr: float = 5e-5              # Sec. 4.1: AdamW, constant
    lr_decay: float = 0.0         # ours: half-cosine decay to 0 over this last fraction; 0: none
    beta2: float = 0.99           # Sec. 4.1: betas (0.9, 0.99), weight decay 0
    grad_clip: float = 1.0        # Sec. 4.1
    w_cons: float = 0.25          # ours: lambda_cons (Eq. 5), 0.25 per auxiliary term as the authors' precursor
    w_data: float = 1.0           # ours: lambda_data (Eq. 13), the anchor of the one-step estimate
    w_lpips: float = 1.0          # ours: lambda_lpips inside L_data (Eq. 13)
    lpips_weights: str = ""       # a local torchvision VGG16 file for LPIPS (default: torch hub's)
    w_adv: float = 0.25           # ours: lambda_adv (Eq. 8), the precursor's
    w_rect: float = 0.25          # ours: lambda_rect (Eq. 11), the precursor's
    tar_min_s: float = 0.05       # ours: w(s) = (1 - s)^2 / max(s, tar_min_s); Eq. 14 is infinite at s = 0
    const_weight: bool = False    # Table 3 ablation: w(s) = 1 instead of TAR (Eq. 14)
    fused_t: bool = False         # Table 3 ablation: temb(t) + temb2(t_tar) for all tokens instead of DTC
    zero_init: bool = False       # ours: v = DiT + z_t - z_lr with a zeroed output layer: the one step starts at z_lr
    prompt: str = ""              # Sec. 4.1: the empty prompt
    max_steps: int = 47000        # Sec. 4.1: ~47k steps
    batch_size: int = 4           # Sec. 4.1: 1 per GPU x 2 GPUs x 2 accumulation
    micro_batch: int = 1          # Sec. 4.1
    grad_ckpt: bool = True        # ours: gradient checkpointing of the DiT blocks (GPU only)
    crop: int = 512               # ours, as SMFSR: 512 HR crops
    seed: int = 0                 # ours
    log_every: int = 10           # ours
    save_every: int = 1000        # ours
    grid_every: int = 500         # ours
    num_workers: int = 2          # ours: data loader processes
    sample: bool = False          # sample instead of training: --ckpt, --input, --output
    ckpt: str = ""                # checkpoint folder, or an out_dir (its latest ckpt-*)
    input: str = ""               # LR image or folder
    output: str = "out/teasr/sr"  # folder of the SR images
    steps: int = 1                # Algorithm 1: any N; the paper reports 1, 2, 4, 8, 30 (Table 2)
    tile: int = 0                 # latent tile; 0: ours, 128 (1024 px)
    overlap: int = 0              # latent overlap; 0: ours, 32 (256 px)
    eval_heldout: bool = False    # ours: at the end, the held-out photo scored against bicubic
    ema_decay: float = 0.0        # paper: 0 (no EMA); ours: e.g. 0.999, the trained weights' EMA
    ema: bool = True              # ours: --sample uses the checkpoint's EMA weights when saved
    val_every: int = 0            # ours: validate every N steps on --val (0: never)
    val: str = ""                 # ours: HR image or folder to validate on; "": the held-out photo

# --model tiny / mini (ours): these values for every flag not given
TINY = dict(max_steps=20, crop=64, lora_rank=8, lora_alpha=8.0, batch_size=2, tile=8, overlap=2)
# mini: the whole base trains (a frozen 2M noise branch cannot read the condition tokens), from
# z0_hat = z_lr; w_data 3000: the pixel MSE (~0.003) must lead, else L_flow's gradient drowns
# the one step's reading of the condition tokens; w_rect 0.05: a 2M base's score difference
# (Eq. 10) is mostly noise; no LPIPS (offline: a random VGG); tile 16: the whole crop
MINI = dict(max_steps=1200, crop=128, lora_rank=32, lora_alpha=32.0, lr=1e-3, lr_decay=0.5, w_data=3000.0, w_lpips=0.0,
            w_rect=0.05, batch_size=4, micro_batch=4, tile=16, overlap=4, grid_every=300, save_every=300,
            eval_heldout=True, degrade="bicubic", train_base="full", zero_init=True)

def resolve(cfg):
    """The concrete preset and tile; the flags checked."""
    preset = common.resolve_preset(cfg.model, Config.model)
    if common.PRESETS[preset].family != "qwen":
        raise SystemExit(f"--model {cfg.model}: TEASR is built on Qwen-Image (dual-stream blocks, per-token "
                         f"modulation)")
    common.check_choices(cfg, train_base=("none", "full"))
    common.check_zero_init(cfg)
    check_preset(cfg.degrade)
    cfg = dataclasses.replace(cfg, model=preset, tile=cfg.tile or 128, overlap=cfg.overlap or 32)
    if cfg.crop % 16 or cfg.steps < 1 or cfg.tile % 2 or cfg.overlap % 2 or not 2 <= cfg.overlap <= cfg.tile // 2:
        raise SystemExit(f"--crop {cfg.crop} --steps {cfg.steps} --tile {cfg.tile} --overlap {cfg.overlap}: "
                         f"expected a multiple of 16, N >= 1, even tiles with 2 <= overlap <= tile / 2")
    return cfg

def pretrained(cfg):
    """Every pretrained network a run of cfg loads: checked before anything is built, fetched by
    `python common.py prefetch --method teasr`. The text encoder encodes the empty prompt once."""
    return [common.base_weights(cfg, text=True)] + ([common.lpips_weights(cfg)] if cfg.w_lpips else [])

# ------------------------------------------------------------ model: the dual-branch DiT
# image-stream linears of every block: they see the [noise | condition] token sequence
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.0.proj", "img_mlp.net.2")
# the last block's condition outputs are never read: only its keys/values
LAST_TARGETS = ("attn.to_k", "attn.to_v")

class CondLoRA(nn.Module):
    """LoRA on the condition tokens only (OminiControl): a forward hook on a frozen Linear whose
    input is the token sequence [noise | condition] (equal halves). The noise half keeps the base
    output bit for bit; the condition half gets + alpha/rank * up(down(x))."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        # kaiming-uniform, as peft's default
        self.down = nn.Linear(base.in_features, rank, bias=False)
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
    condition-token LoRA of every target Linear of `dit`, and the t_tar embedder (a copy of the
    base's timestep MLP, Sec. 3.3; zero-initialised and summed in for --fused_t). Built by
    attach_cond_branch, which hooks it onto the base."""

    def __init__(self, dit, rank, alpha, fused_t=False, lr_skip=False):
        super().__init__()
        self.fused_t, self.lr_skip = fused_t, lr_skip
        mods = dict(dit.named_modules())
        last = len(dit.transformer_blocks) - 1
        self.targets = ["img_in"] + [f"transformer_blocks.{i}.{t}" for i in range(last + 1)
                                     for t in (LAST_TARGETS if i == last else LORA_TARGETS)]
        self.lora = nn.ModuleDict({k.replace(".", "_"): CondLoRA(mods[k], rank, alpha) for k in self.targets})
        self.t_embedder = copy.deepcopy(dit.time_text_embed.timestep_embedder).float()
        if fused_t:
            nn.init.zeros_(self.t_embedder.linear_2.weight)
            nn.init.zeros_(self.t_embedder.linear_2.bias)
        self.requires_grad_(True)

def split_modulation(dit):
    """Switch dit's blocks to per-token modulation (diffusers' zero_cond_t), as v_theta needs: each
    token takes the half of temb that v_theta's index names, the text tokens the first half."""
    for block in dit.transformer_blocks:
        block.zero_cond_t = True
    return dit

def attach_cond_branch(dit, rank, alpha, fused_t=False, lr_skip=False):
    """Make `dit` the dual-branch DiT and return its condition branch: the base frozen (the noise
    branch), its modulation split per token group, the branch's CondLoRA hooked on its Linears."""
    if dit.config.use_additional_t_cond:
        raise SystemExit("TEASR: a base with additional_t_cond (Qwen-Image-Layered) is not supported")
    dit.requires_grad_(False)  # the noise branch is the frozen base
    branch = CondBranch(dit, rank, alpha, fused_t, lr_skip)
    mods = dict(split_modulation(dit).named_modules())
    for k in branch.targets:
        mods[k].register_forward_hook(branch.lora[k.replace(".", "_")])
    return branch

def v_theta(dit, branch, z_t, t, z_lr, t_tar, cond):
    """Dual-branch velocity v_theta(z_t, t, z_lr, t_tar) -> (B, C, H, W), v = eps - z_0 (Fig. 2).
    z_t, z_lr (B, C, H, W); t, t_tar (B,). The base's own modules run in the base's order (as
    QwenImageTransformer2DModel.forward); what differs: the LR tokens join the image sequence at the
    same positions, and each token group has its own time embedding. branch=None: a DiT with no
    branch, only split_modulation; the condition tokens take the base's own time embedding."""
    B, C, H, W = z_t.shape
    n = H * W // 4  # tokens per group (2x2 packing)
    # tokens [noise | condition], both through the patch embedding; its LoRA acts on the second half
    x = dit.img_in(torch.cat([common.pack(z_t), common.pack(z_lr)], 1).to(dit.dtype))  # (B, 2n, D)
    # DTC: noise tokens modulated by temb(t), condition tokens by temb2(t_tar)
    proj = dit.time_text_embed.time_proj  # sinusoids of 1000 t (no parameters)
    temb_t = dit.time_text_embed.timestep_embedder(proj(t).to(x.dtype))  # (B, D)
    embed_tar = branch.t_embedder if branch is not None else dit.time_text_embed.timestep_embedder
    temb_tar = embed_tar(proj(t_tar).to(x.dtype))  # (B, D)
    # ablation: temb1(t_cur) + temb2(t_tar), the same for every token
    if branch is not None and branch.fused_t:
        temb_t = temb_tar = temb_t + temb_tar
    temb = torch.cat([temb_t, temb_tar])  # (2B, D): noise rows, then condition rows
    # (B, 2n): 0 noise, 1 condition
    index = (torch.arange(2 * n, device=x.device) >= n).int().expand(B, -1)
    txt = dit.txt_in(dit.txt_norm(cond["embeds"].to(dit.dtype).expand(B, -1, -1)))  # (B, L, D)
    mask = cond["mask"].bool().expand(B, -1) if "mask" in cond else None
    img_freqs, txt_freqs = dit.pos_embed([(1, H // 2, W // 2)], device=x.device, max_txt_seq_len=txt.shape[1])
    # both groups at the same positions (OminiControl)
    rope = (torch.cat([img_freqs, img_freqs]), txt_freqs)
    for block in dit.transformer_blocks:
        args = (x, txt, mask, temb, rope, None, index)
        if torch.is_grad_enabled() and dit.gradient_checkpointing:
            txt, x = dit._gradient_checkpointing_func(block, *args)
        else:
            txt, x = block(*args)
    x = dit.norm_out(x[:, :n], temb_t)  # the velocity is read from the noise tokens
    v = common.unpack(dit.proj_out(x).float(), H, W)
    # --zero_init: at v = 0, z0_hat = z_lr
    return v + (z_t - z_lr) if branch is not None and branch.lr_skip else v

def bind(dit, branch, z_lr, cond):
    """v(z, t, t_tar) for this batch's LR latent; z may stack k copies of the batch, one forward."""
    def v(z, t, t_tar):
        return v_theta(dit, branch, z, t, z_lr.repeat(z.shape[0] // z_lr.shape[0], 1, 1, 1), t_tar, cond)
    return v

def build_dual_dit(cfg, device):
    """The dual-branch DiT to train, on device: the base (frozen, in bf16 on GPU; --train_base full:
    trained, in fp32) and its condition branch, the same init on every rank; then the frozen VAE and
    the prompt's condition. Returns (dit, branch, vae, cond)."""
    dtype = common.weight_dtype(device) if cfg.train_base == "none" else torch.float32
    dit = common.load_dit(cfg.model, cfg.model_path or None, dtype).requires_grad_(False).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        branch = attach_cond_branch(dit, cfg.lora_rank, cfg.lora_alpha, cfg.fused_t, cfg.zero_init)
    if cfg.train_base == "full":
        dit.requires_grad_(True)
    if cfg.zero_init:  # v = z_t - z_lr: the one step returns z_lr (a resume overwrites it)
        common.zero_output(dit)
    # the prompt before the DiT moves to the device: the text encoder is never there beside it
    cond = common.fixed_prompt(cfg, dit, device, cfg.out_dir, cfg.prompt)
    dit, branch = dit.to(device), branch.to(device).train()
    return dit, branch, common.load_vae(cfg.model, cfg.model_path or None, dtype, device), cond

# ------------------------------------------------------------ losses
def flow_loss(v, z_hr, t, eps):
    """L_flow (Eq. 5): the instantaneous velocity (t_tar = t) on the real trajectory."""
    z_t = (1 - bc(t)) * z_hr + bc(t) * eps
    return F.mse_loss(v(z_t, t, t), eps - z_hr)                # Eq. (5), L_flow

def consistency_loss(v, z_hr, t, s, eps):
    """L_cons (Eqs. 1-4): one shortcut step t -> s against two half steps through the midpoint m."""
    z_t = (1 - bc(t)) * z_hr + bc(t) * eps
    m = (t + s) / 2
    with torch.no_grad():  # paper != code: the paper does not write sg on v2; shortcut models do
        v_tm = v(z_t, t, m)
        z_m = z_t - bc(t - s) / 2 * v_tm                       # Eq. (2)
        v2 = 0.5 * v_tm + 0.5 * v(z_m, m, s)                   # Eq. (3)
    v1 = v(z_t, t, s)                                          # Eq. (1)
    return F.mse_loss(v1, v2)                                  # Eq. (4)

def one_step(v, eps):
    """Eq. (6): z0_hat = eps - v(eps, 1, z_lr, 0); returns (z0_hat, v_gen), v_gen with its graph."""
    ones = torch.ones(eps.shape[0], device=eps.device)
    v_gen = v(eps, ones, 0 * ones)
    return eps - v_gen, v_gen                                  # Eq. (6)

def data_loss(vae, lpips, z0_hat, x_hr, w_lpips):
    """L_data (Eqs. 12-13) on the decoded one-step estimate; returns (L_data, mse, lpips, x_sr)."""
    x_sr = common.decode(vae, "qwen", z0_hat)                  # Eq. (12)
    mse = F.mse_loss(x_sr, x_hr)
    lp = lpips(x_sr, x_hr) if w_lpips else mse.new_zeros(())   # weight 0: no VGG pass at all
    return mse + w_lpips * lp, mse, lp, x_sr                   # Eq. (13)

def adv_loss(v, z0_hat, t, eps_fake):
    """L_adv (Eqs. 7-8): flow matching on the fake trajectory of sg(z0_hat), target time -t'."""
    z0_hat = z0_hat.detach()                                   # sg in Eqs. (7) and (8)
    z_t = bc(t) * eps_fake + (1 - bc(t)) * z0_hat              # Eq. (7)
    return F.mse_loss(v(z_t, t, -t), eps_fake - z0_hat)        # Eq. (8)

def tar_weight(s, min_s=0.05, const=False):
    """Eq. (14): w(s) = (1 - s)^2 / s, the denominator clamped at min_s (w(0) = 1/min_s, finite);
    const: the ablation's w = 1."""
    return torch.ones_like(s) if const else (1 - s) ** 2 / s.clamp_min(min_s)

def rectify_loss(v, v_gen, z0_hat, s, eps_rect, min_s=0.05, const=False):
    """L_rectify (Eqs. 9-11, TAR Eq. 14): v_gen = v(eps, 1, 0), the forward of Eq. 6, is pulled by
    -w(s) Delta, Delta (no gradient) = fake score - real score at the re-noised estimate."""
    z_s = bc(s) * eps_rect + (1 - bc(s)) * z0_hat.detach()                     # Eq. (9)
    with torch.no_grad():  # sg of Eq. (11): both scores in one batched forward
        v_fake, v_real = v(torch.cat([z_s, z_s]), torch.cat([s, s]), torch.cat([-s, s])).chunk(2)
        delta = bc(tar_weight(s, min_s, const)) * (v_fake - v_real)          # Eqs. (10), (14)
    return F.mse_loss(v_gen, v_gen.detach() - delta)                          # Eq. (11)

def teasr_losses(v, vae, lpips, z_hr, x_hr, cfg):
    """Every term of one training step on a micro-batch (Secs. 3.1-3.2): L_base, L_data, L_adv,
    L_rectify, from 4 DiT forwards with gradient (flow, shortcut, one-step, fake trajectory) and 3
    without (two for the shortcut target, a batched 2B one for Eq. 10). Returns (L, terms, x_sr)."""
    rand = lambda: torch.rand(z_hr.shape[0], device=z_hr.device)
    l_flow = flow_loss(v, z_hr, rand(), torch.randn_like(z_hr))  # real trajectory, L_base (Eq. 5)
    t = rand()
    l_cons = consistency_loss(v, z_hr, t, t * rand(), torch.randn_like(z_hr))  # ours: s ~ U(0, t)
    # Eq. (6): its forward feeds L_rectify and L_data
    z0_hat, v_gen = one_step(v, torch.randn_like(z_hr))
    l_rect = rectify_loss(v, v_gen, z0_hat, rand(), torch.randn_like(z_hr), cfg.tar_min_s, cfg.const_weight)
    l_data, l_mse, l_lpips, x_sr = data_loss(vae, lpips, z0_hat, x_hr, cfg.w_lpips)
    # the fake trajectory (Eqs. 7-8) on sg(z0_hat)
    l_adv = adv_loss(v, z0_hat, rand(), torch.randn_like(z_hr))
    loss = l_flow + cfg.w_cons * l_cons + cfg.w_data * l_data + cfg.w_adv * l_adv + cfg.w_rect * l_rect
    return loss, dict(loss=loss, flow=l_flow, cons=l_cons, mse=l_mse, lpips=l_lpips, adv=l_adv, rect=l_rect), x_sr

# ------------------------------------------------------------ sampler
def sample(v, eps, steps):
    """Algorithm 1: N Euler steps on tau_i = 1 - i/N from z = eps; the noise branch sees tau_i, the
    condition branch tau_{i+1}, where the step lands."""
    tau = torch.linspace(1, 0, steps + 1, device=eps.device)
    z, ones = eps, torch.ones(eps.shape[0], device=eps.device)
    for i in range(steps):
        z = z - (tau[i] - tau[i + 1]) * v(z, tau[i] * ones, tau[i + 1] * ones)  # Delta tau = 1/N
    return z

def build_sampler(flags, device=None):
    """fn(x_lr (1, 3, h, w) in [0, 1]) -> (1, 3, 4h, 4w) of the checkpoint flags.ckpt: bicubic x4,
    encode, Algorithm 1's N steps from seeded noise (velocities over overlapping tiles), decode."""
    path, cfg, device, dtype = common.sampler_setup(flags, resolve, pretrained, device)
    dit = common.load_dit(cfg.model, cfg.model_path or None, dtype).requires_grad_(False).eval()
    # the LoRA init is overwritten; keep the caller's RNG as it was
    with torch.random.fork_rng(devices=[]):
        branch = attach_cond_branch(dit, cfg.lora_rank, cfg.lora_alpha, cfg.fused_t, cfg.zero_init)
    # "dit": the base's own weights, in the checkpoint only with --train_base full
    state = common.load_checkpoint(path, {"cond_branch": branch, "dit": dit}, ema=cfg.ema)
    dit, branch = common.sampling_weights(cfg, dtype, dit).to(device), branch.to(device).eval()
    vae = common.load_vae(cfg.model, cfg.model_path or None, dtype, device, tiling=True)
    cond = {k: v.to(device) for k, v in state["cond"].items()}

    def latent(z_lr):
        eps = torch.randn(z_lr.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        v = lambda z, t, t_tar: common.tiled_pair(lambda zz, ll: v_theta(dit, branch, zz, t, ll, t_tar, cond),
                                                  z, z_lr, cfg.tile, cfg.overlap)
        return sample(v, eps, cfg.steps)
    return common.finish_sampler(lambda x_lr: common.super_resolve(vae, "qwen", x_lr, latent), cfg)

# ------------------------------------------------------------ training
def train(cfg):
    cfg = resolve(cfg)
    rank, world, device, log = common.setup(cfg, pretrained(cfg))

    # 1. models: one DiT in memory (teacher, student and fake score), the frozen VAE, LPIPS
    dit, branch, vae, cond = build_dual_dit(cfg, device)
    common.checkpointing(cfg, device, dit)
    random_nets = common.PRESETS[cfg.model].hub is None
    lpips = common.load_lpips(device, "random" if random_nets else cfg.lpips_weights) if cfg.w_lpips else None

    # 2. optimizer on the condition branch only (--train_base full: and the base), gradient clipping
    params = common.trainable(branch, dit)
    opts = {"opt": torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=0.0)}
    what = "condition LoRA + t_tar embedder" + (" + the base" if cfg.train_base == "full" else "")
    n_frozen = sum(p.numel() for p in dit.parameters() if not p.requires_grad)
    log(f"{cfg.model}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters ({what})" +
        (f", {n_frozen / 1e6:.2f}M frozen" if n_frozen else ""))
    models = {"cond_branch": branch, "dit": dit}  # a frozen dit is not saved

    # 3. resume; 4. the loader, data position = step
    step, _ = common.resume(cfg.out_dir, models, opts, log)
    loader, accum = make_loader(ImageDataset(cfg.data, cfg.crop, cfg.data_root), cfg, rank, world, step)
    log(f"batch {cfg.batch_size} = {world} ranks x {accum} accum x {cfg.micro_batch}, crop {cfg.crop}")

    # 5. loop: each micro-batch seeded by its place in the run (a resume or any number of ranks
    # draws the same numbers); the degradation runs in fp32, outside autocast
    scale = 1 / accum
    saved = {"cond": {k: v.detach().cpu() for k, v in cond.items()}}  # the prompt the sampler uses
    import eval  # the held-out scores: --val_every, and --eval_heldout at the end
    val = eval.validation("teasr", build_sampler, cfg, device) if rank == 0 and cfg.val_every else None
    ema = common.start_ema(cfg, models)
    log.start_clock()
    while step < cfg.max_steps:
        sums = {}
        for j in range(accum):
            torch.manual_seed(common.micro_batch_seed(cfg.seed, step + 1, rank * accum + j))
            with torch.no_grad():
                x_lr, x_hr = degrade(next(loader).to(device), 4, DEGRADE[cfg.degrade])
                with common.autocast(device):
                    z_hr, z_lr = common.encode_pair(vae, "qwen", x_hr, x_lr)
            with common.autocast(device):
                loss, terms, x_sr = teasr_losses(bind(dit, branch, z_lr, cond), vae, lpips, z_hr, x_hr, cfg)
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
        eval.heldout("teasr", build_sampler, cfg.out_dir, cfg.degrade, cfg.data_root)

if __name__ == "__main__":
    cfg = common.parse_config(Config)
    if cfg.sample:
        common.sample_files(build_sampler(cfg), cfg.input, cfg.output)
    else:
        train(cfg)
    common.cleanup()
