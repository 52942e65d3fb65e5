"""
StrSR: Spectral and Trajectory Regularization for Diffusion Transformer Super-Resolution
(Wang, Tang, Gong, Li, Li, Liu, Lan, Liu, Zhang; ECCV 2026; arXiv:2603.06275).

One-step real-world x4 SR by adversarial distillation of a text-to-image DiT (FLUX.2-klein
"StrSR-F", the default, or Z-Image-Turbo "StrSR-Z") with a LoRA. The LR image enters twice (the
"dual encoder", Sec. 3.2): its VAE latent is the starting point of one Euler step, and a frozen
Qwen3-VL reads it to replace the text condition. A frozen CLIP ConvNeXt-XXLarge with small trainable
heads is the discriminator (Sec. 3.3); a frequency distribution loss fights the DiT's periodic grid
artifacts (Sec. 3.4). Sigma convention: t = 1 is noise, v = eps - z_0.

  (5)  c = MLP(E_vlm(x_lr))                     MLP: Linear(H_vlm, d/2) -> SiLU -> Linear(d/2, d)
  (6)  z_lr = E_vae(bicubic_x4(x_lr))
       z0_hat = z_lr - t* v_theta(z_lr, t*, c), t* = 0.8;  x_sr = D_vae(z0_hat)     (Sec. 3.1, one step)
  (7)  D_Ra(a, b) = C(a) - mean_batch C(b), per discriminator level, summed over levels
       L_D = 0.5 [BCE(D_Ra(x_hr, x_sr), 1) + BCE(D_Ra(x_sr, x_hr), 0)]
       L_G = 0.5 [BCE(D_Ra(x_sr, x_hr), 1) + BCE(D_Ra(x_hr, x_sr), 0)]
  (8)  L_R1 = mean || C(x_hr) - C(x_hr + n) ||^2,  n small noise (approximate R1)
  (9)  L_Dis = L_D + lambda_r1 L_R1                                      lambda_r1 = 10
  (10) FDL = sum_l SW(|F phi_l(x)|, |F phi_l(y)|) + lambda_p SW(ang F phi_l(x), ang F phi_l(y))
       phi_l: VGG19 relu{1_2,2_2,3_4,4_4,5_4}, F: 2-D DFT, SW: sliced Wasserstein distance
  (11) L_Gen = 1.0 L1 + 3.0 LPIPS + 0.1 L_G + lambda_fdl FDL,  lambda_fdl = 0 (stage 1), 0.002 (stage 2)

  python strsr.py --model mini                                     # CPU: scored against bicubic
  python strsr.py --model tiny --stage 2                           # continues stage 1, adds FDL
  torchrun --nproc_per_node=4 strsr.py --data LSDIR                # stage 1: 40k steps
  torchrun --nproc_per_node=4 strsr.py --data LSDIR --stage 2      # stage 2: 20k more steps, FDL
  python strsr.py --stage 2 --init_ckpt out/strsr --out_dir out/strsr-s2   # stage 2 in a new folder
  python strsr.py --model zimage --cond text                       # Table 4 ablation (w/o VLM)
  python strsr.py --sample --ckpt out/strsr --input photo.png --output out/strsr/sr

Where the paper is silent or differs, this follows the authors' release, github.com/jkwang28/StrSR
(it produced the reported numbers), marked `# official != paper` or `# official` at the line:
  - StrSR-F fine-tunes FLUX.2-klein-base-4B, the undistilled base (the paper names FLUX.2-klein-4B,
    the `flux2-klein` preset); StrSR-Z Z-Image-Turbo.
  - The condition (Eq. 5) reads only the non-image tokens of Qwen3-VL's last hidden state (the chat
    template, the vision start/end tokens, the prompt; at most 512), with the release's prompt: its
    length does not grow with the LR.
  - R1 (Eq. 8): one-sided uniform noise, U[0, 0.005) on [-1, 1] images (the paper: Gaussian).
  - The discriminator heads: BlurPool (binomial 4x4, zero padding 2) -> SN conv 3x3 stride 2 ->
    LeakyReLU(0.2) -> BlurPool (padding 1) -> SN conv 1x1 stride 2: patch logits at 1/4 of each
    feature map. D sees the full crop. D's loss is Eq. 7 per level, summed with weight 1, the batch
    mean taken per spatial position; the release also computes vision-aided-loss's
    multilevel_loss(alpha=0.8) (a BCE with real labels smoothed to 0.8) and discards it.
  - D's heads run in eval mode in the G pass: no spectral-norm power iteration there.
  - FDL (Eq. 10) sees [-1, 1] images, as the release feeds it, though its VGG normalises for [0, 1]
    (--fdl_01 true: FDL's own convention); L1 on [-1, 1] images.
  - z_lr is a draw of the VAE's latent distribution (latent_dist.sample()), not its mode; StrSR-Z
    takes the raw latent: the release applies the VAE's shift and scale only when decoding.
  - AdamW's default weight decay (0.01), gradient clipping at 1.0, LoRA alpha = rank, Gaussian init.
And ours (`# ours`):
  - G and D update on the same batch, from one backward of L_Gen + L_Dis (D on the detached output,
    reusing the G pass's backbone features): no second G forward. The release alternates batches.
  - Random crops with flips of --data (release: 1024 center crops of Aesthetic-Train-V2, no flips).
  - The condition MLP in fp32 (release: bf16); the VLM's input resized once, to a multiple of 32.
  - Sampling tiles in latent space (release: 1024 px tiles in pixel space, each through the VAE).
  - FDL's projection kernels are drawn once (fixed seed): a resumed run is bit-identical.
  - Stage 2 continues the stage-1 run, optimizers included, in its --out_dir (or from --init_ckpt).
  - Tiny and mini presets: random Qwen3-VL, ConvNeXt and VGGs of the same classes.
"""
import dataclasses, os

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from degrade import PRESETS as DEGRADE, ImageDataset, check_preset, degrade, make_loader

# ------------------------------------------------------------ config
OFFICIAL_PROMPT = ("Descibe this image in detail, especially the text in image. Cinematic, hyper sharpness, highly "
                   "detailed, perfect without deformations. Camera, hyper detailed photo, realistic maximum detail, "
                   "32k, Color. Grading, ultra HD, extreme meticulous detailing, skin pore detailing")  # typo theirs

@dataclasses.dataclass
class Config(common.SampleFlags):  # + the shared sampling flags
    model: str = "flux2-klein-base"  # official != paper: klein-base-4B (StrSR-F); zimage: StrSR-Z
    model_path: str = ""          # local folder of the base pipeline (else the preset's hub id)
    data: str = "sample"          # paper: LSDIR + Aesthetic-4K; official: Aesthetic-Train-V2 (50k)
    data_root: str = "data"       # folder of the named datasets
    degrade: str = "realesrgan"   # degrade.PRESETS name of the LR (paper: Real-ESRGAN)
    out_dir: str = "out/strsr"    # checkpoints, log.txt, grids/
    stage: str = "1"              # Sec. 4.1: stage 1 without FDL, stage 2 with FDL
    init_ckpt: str = ""           # stage 2 in a new out_dir: start from this stage-1 checkpoint
    max_steps: int = 0            # 0: the paper's 40k (stage 1) / 20k (stage 2)
    batch_size: int = 4           # paper: batch 4 (1 per GPU x 4 A800)
    micro_batch: int = 1          # paper: 1 per GPU
    crop: int = 0                 # 0: the paper's 1024 (it center-crops; here random crops)
    seed: int = 0                 # ours
    log_every: int = 10           # ours
    save_every: int = 1000        # ours
    grid_every: int = 500         # ours
    num_workers: int = 2          # ours: data loader processes
    grad_ckpt: bool = True        # official: of DiT, VAE and D backbone (GPU only)
    fsdp: bool = False            # ours: FSDP2 shards the frozen DiT over the ranks
    train_base: str = "lora"      # paper: a LoRA on the DiT; full: every weight (ours, the mini)
    lora_rank: int = 256          # paper
    lora_alpha: float = 256.0     # official
    t_star: float = 0.8           # official: the fixed time of the one step
    cond: str = "vlm"             # vlm (Eq. 5) | none (Table 4 "w/o emb") | text ("w/o VLM")
    vlm: str = "Qwen/Qwen3-VL-4B-Instruct"  # paper
    vlm_prompt: str = OFFICIAL_PROMPT  # official: the release's wording (the paper gives none)
    vlm_max_pixels: int = 1024 * 1024  # ours: caps the VLM's input on huge images at sampling time
    disc_ckpt: str = ""           # a local open_clip CLIP-ConvNeXt-XXLarge (default: laion's)
    disc_width: int = 512         # official: channels of the discriminator heads
    r1_noise: float = 0.005       # official: R1 noise U[0, r1_noise) on [-1, 1] images
    w_l1: float = 1.0             # paper: L1 weight (Eq. 11)
    w_lpips: float = 3.0          # paper: LPIPS weight (Eq. 11)
    w_gan: float = 0.1            # paper: L_G weight (Eq. 11)
    w_fdl: float = 0.002          # paper: lambda_fdl, stage 2 only (0 in stage 1)
    w_r1: float = 10.0            # paper: lambda_r1 (Eq. 9)
    fdl_phase: float = 1.0        # official: lambda_p, FDL's phase weight (Eq. 10)
    fdl_01: bool = False          # official != FDL's convention: [-1, 1] images; true: [0, 1]
    fdl_projections: int = 256    # official: random projections per VGG layer
    lpips_weights: str = ""       # a local torchvision VGG16 file for LPIPS (default: torch hub's)
    fdl_weights: str = ""         # a local torchvision VGG19 file for FDL (default: torch hub's)
    lr: float = 5e-6              # paper: generator (LoRA and condition MLP)
    lr_d: float = 1e-6            # paper: discriminator heads
    weight_decay: float = 0.01    # official: AdamW's default (the paper: "default betas")
    grad_clip: float = 1.0        # official
    lr_decay: float = 0.0         # ours: half-cosine decay to 0 over this last fraction; 0: none
    zero_init: bool = False       # ours: a new full fine-tuning zeroes the output layer: v = 0
    sample: bool = False          # sample instead of training: --ckpt, --input, --output
    ckpt: str = ""                # checkpoint folder, or an out_dir (its latest ckpt-*)
    input: str = ""               # LR image or folder
    output: str = "out/strsr/sr"  # folder of the SR images
    steps: int = 1                # paper: 1; K > 1: the same path t* -> 0 in K Euler steps (ours)
    tile: int = 0                 # latent tile; 0: the paper's 1024 px in latent units
    overlap: int = 0              # latent overlap; 0: the paper's 64 px
    eval_heldout: bool = False    # ours: at the end, the held-out photo scored against bicubic
    ema_decay: float = 0.0        # paper: 0 (no EMA); ours: e.g. 0.999, the trained weights' EMA
    ema: bool = True              # ours: --sample uses the checkpoint's EMA weights when saved
    val_every: int = 0            # ours: validate every N steps on --val (0: never)
    val: str = ""                 # ours: HR image or folder to validate on; "": the held-out photo

# --model tiny / mini (ours): these values for every flag not given; a dict holds one per --stage
TINY = dict(crop=64, max_steps={"1": 20, "2": 10}, disc_width=32, fdl_projections=32)
# mini: a 2M base trains fully, at a larger lr; zero_init: unlearning its own step from z_lr costs
# the run; w_gan, w_lpips 0: their networks are random offline and cost most of a step
MINI = dict(max_steps=1200, crop=128, train_base="full", lr=5e-4, lr_decay=0.5, zero_init=True, micro_batch=4,
            w_gan=0.0, w_lpips=0.0, disc_width=32, fdl_projections=32, tile=16, overlap=4, grid_every=300,
            save_every=300, eval_heldout=True, degrade="bicubic", val_every=100)

STAGES = ("1", "2")

def resolve(cfg):
    """The flags checked; the concrete preset, crop and step count (0: the paper's, per stage)."""
    common.check_choices(cfg, stage=("1", "2"), cond=("vlm", "none", "text"), train_base=("lora", "full"))
    check_preset(cfg.degrade)
    if cfg.fsdp and cfg.train_base == "full":
        raise SystemExit("--fsdp shards the frozen base; with --train_base full none of it is frozen")
    common.check_zero_init(cfg)
    preset = common.resolve_preset(cfg.model, Config.model)
    if common.PRESETS[preset].family not in ("flux2", "zimage"):
        raise SystemExit(f"--model {preset}: StrSR is defined on the flux2 and zimage families")
    return dataclasses.replace(cfg, model=preset, crop=cfg.crop or 1024,
                               max_steps=cfg.max_steps or {"1": 40000, "2": 20000}[cfg.stage])

# open_clip's laion2b_s34b_b82k_augreg_soup
CLIP_HUB = "laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup"

def pretrained(cfg):
    """Every pretrained network a run of cfg loads: checked before anything is built, fetched by
    `python common.py prefetch --method strsr`."""
    needs = [common.base_weights(cfg, text=cfg.cond == "text")]
    if cfg.cond == "vlm":
        needs.append(common.Weights("Qwen3-VL (E_vlm, Eq. 5)", cfg.vlm, "vlm", ("config.json", "tokenizer.json"),
                                    ("*.json", "*.safetensors", "*.txt"), sample=True))
    if cfg.w_gan:  # Table 4's "w/o GAN": no discriminator
        needs.append(common.Weights("CLIP ConvNeXt-XXLarge (C, Sec. 3.3)", cfg.disc_ckpt or CLIP_HUB, "disc_ckpt",
                                    ("open_clip_pytorch_model.bin",)))  # the release's file
    if cfg.w_lpips:
        needs.append(common.lpips_weights(cfg))
    if cfg.stage == "2" and cfg.w_fdl:
        needs.append(common.Weights("VGG19 of FDL (Eq. 10)", cfg.fdl_weights or common.VGG19_URL, "fdl_weights"))
    return needs

# ------------------------------------------------------------ generator and dual encoder
LORA_TARGETS = {  # official; a regex for FLUX.2, whose double blocks' attn.to_out is a ModuleList
    "flux2": r".*(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
             r"to_add_out)|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))",
    "zimage": ["to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"],
}

def one_step(dit, family, z_lr, c, t_star, steps=1):
    """z0_hat = z_lr - t* v_theta(z_lr, t*, c): one Euler step from t* to 0, starting at the clean
    LR latent (no noise added). steps > 1 walks the same straight path in K equal Euler steps."""
    z, ts = z_lr, torch.linspace(t_star, 0, steps + 1).tolist()
    for t, s in zip(ts[:-1], ts[1:]):
        v_theta = common.velocity(family, dit, z, torch.full((z.shape[0],), t, device=z.device), c)
        z = z - (t - s) * v_theta  # Sec. 3.1, Eq. (6)
    return z

def lr_latent(vae, family, x_lr, rng=None):
    """z_lr of Eq. 6: bicubic x4 of the LR, encoded by a draw of the VAE's latent distribution
    (official: sample(), not the mode), from `rng` or the global RNG."""
    return release_latent(vae, family, common.encode(vae, family, common.upsample_lr(x_lr), True, rng))

def release_latent(vae, family, z_lr):
    """StrSR-Z: the release feeds the raw Z-Image latent, without the VAE's shift and scale (it
    applies them only when decoding); every other family's normalised latent as it is."""
    if family != "zimage":
        return z_lr
    mean, std = common.latent_stats(vae, family, z_lr)
    return z_lr * std + mean  # official != pipeline: the shift and scale only on the way out

def tiny_vlm_config():
    """A Qwen3-VL of the real classes and layout (deepstack vision tower, M-RoPE text model)."""
    from transformers import Qwen3VLConfig
    rope = dict(rope_type="default", rope_theta=5e5, mrope_section=[4, 2, 2], mrope_interleaved=True)
    return Qwen3VLConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_parameters=rope),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=100, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103)

class VLMEncoder(nn.Module):
    """E_vlm: the LR image + a fixed describe-the-image prompt through a frozen Qwen3-VL; returns
    the last hidden states of its non-image tokens (B, L, H_vlm), at most 512 (official). Pixels are
    resized and patchified here on the device, in the layout of the Qwen2-VL/Qwen3-VL image
    processor (tested against it)."""

    def __init__(self, path=None, prompt="", max_pixels=1024 * 1024, dtype=torch.float32):
        super().__init__()
        from transformers import Qwen3VLModel
        # tiny: random weights, stand-in ids for the chat template around the image
        if path is None:
            cfg = tiny_vlm_config()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.model = Qwen3VLModel(cfg)
            pre, post = [1, 2, cfg.vision_start_token_id], [cfg.vision_end_token_id, 3, 4, 5, 6]
            mean = std = [0.5] * 3
            self.min_pixels, self.max_pixels = 8 * 8, max_pixels
        else:
            from transformers import AutoProcessor
            path = common.local_copy(path)  # a cached hub repo: its files, no hub request
            self.model = Qwen3VLModel.from_pretrained(path, dtype=dtype)
            cfg, proc = self.model.config, AutoProcessor.from_pretrained(path)
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            pre, post = (proc.tokenizer(s, add_special_tokens=False).input_ids for s in text.split(proc.image_token))
            ip = proc.image_processor
            mean, std = ip.image_mean, ip.image_std
            self.min_pixels, self.max_pixels = ip.size["shortest_edge"], min(max_pixels, ip.size["longest_edge"])
        self.model.requires_grad_(False).eval()
        v = cfg.vision_config
        self.patch, self.merge, self.temporal = v.patch_size, v.spatial_merge_size, v.temporal_patch_size
        self.image_token, self.hidden_size = cfg.image_token_id, cfg.text_config.hidden_size
        self.pre, self.post = list(pre), list(post)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):  # frozen: always in eval mode
        return super().train(False)

    def pixels(self, x):
        """(B, 3, h, w) in [0, 1] -> flat patches (B * gh * gw, 3 * T * p * p) and grid (B, 3)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
        B, C, h, w = x.shape
        p, m, T = self.patch, self.merge, self.temporal
        H, W = smart_resize(h, w, factor=p * m, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        if (H, W) != (h, w):  # as the processor: bicubic with antialiasing, no clamp
            x = F.interpolate(x, size=(H, W), mode="bicubic", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        gh, gw = H // p, W // p
        # (B, gh/m, gw/m, m, m, C, T, p, p), the processor's order; a still image fills all T frames
        x = x.reshape(B, C, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, T, -1, -1)
        grid = torch.tensor([[1, gh, gw]] * B, device=x.device)
        return x.reshape(B * gh * gw, C * T * p * p), grid

    @torch.no_grad()
    def forward(self, x_lr):
        B = x_lr.shape[0]
        patches, grid = self.pixels(x_lr.float())
        n = int(grid[0, 1] * grid[0, 2]) // self.merge ** 2
        ids = torch.tensor(self.pre + [self.image_token] * n + self.post, device=x_lr.device).expand(B, -1)
        out = self.model(input_ids=ids, pixel_values=patches.to(self.model.dtype), image_grid_thw=grid,
                         mm_token_type_ids=(ids == self.image_token).int(), attention_mask=torch.ones_like(ids),
                         use_cache=False)
        # official: the non-image tokens
        return out.last_hidden_state[:, ids[0] != self.image_token][:, :512]

class Condition(nn.Module):
    """The DiT's caption tokens. `vlm`: c = MLP(E_vlm(x_lr)) (Eq. 5), the MLP trains with the
    generator; the Table 4 ablations hold a fixed embedding: `none` one zero token, `text` the
    base's own text encoding of an empty prompt (kept as a buffer, so checkpoints carry it)."""

    def __init__(self, mode, width, vlm=None, fixed=None):
        super().__init__()
        self.mode, self.vlm = mode, vlm
        if mode == "vlm":
            h = vlm.hidden_size
            self.mlp = nn.Sequential(nn.Linear(h, width // 2), nn.SiLU(), nn.Linear(width // 2, width))
        else:
            self.register_buffer("embeds", fixed if fixed is not None else torch.zeros(1, 1, width))

    def forward(self, x_lr):
        if self.mode != "vlm":
            return {"embeds": self.embeds.expand(x_lr.shape[0], -1, -1)}
        return {"embeds": self.mlp(self.vlm(x_lr))}  # Eq. (5); the VLM runs once per batch, no grad

def build_generator(cfg, device, ckpt=None, dtype=None):
    """Base DiT + LoRA, VAE and the condition, on `device`. Frozen weights in bf16 on GPU."""
    family, random_nets = common.PRESETS[cfg.model].family, common.PRESETS[cfg.model].hub is None
    # a sampler's --dtype
    dtype, path = dtype or common.weight_dtype(device), cfg.model_path or None
    dit = common.add_lora(common.load_dit(cfg.model, path, dtype), cfg.train_base, cfg.lora_rank, cfg.lora_alpha,
                          LORA_TARGETS[family])
    vae = common.load_vae(cfg.model, path, dtype, device, tiling=ckpt is not None)
    width = dit.config.cap_feat_dim if family == "zimage" else dit.config.joint_attention_dim
    vlm = fixed = None
    if cfg.cond == "vlm":
        vlm = VLMEncoder(None if random_nets else cfg.vlm, cfg.vlm_prompt, cfg.vlm_max_pixels, dtype)
    elif ckpt:  # the fixed embedding is in the checkpoint
        from safetensors.torch import load_file
        fixed = load_file(os.path.join(ckpt, "cond.safetensors"))["embeds"]
    elif cfg.cond == "text":
        fixed = common.fixed_prompt(cfg, dit, device, os.path.join(cfg.out_dir, "cache"))["embeds"].cpu()
    return dit.to(device), vae, Condition(cfg.cond, width, vlm, fixed).to(device)

# ------------------------------------------------------------ discriminator (Sec. 3.3)
class Blur(nn.Module):
    """BlurPool's low-pass as in the release (vision-aided-loss, filter size 4): the binomial kernel
    [1, 3, 3, 1]^T [1, 3, 3, 1] / 64 per channel, zero padding `pad`, stride 1 (the next conv's)."""

    def __init__(self, channels, pad):
        super().__init__()
        k, self.pad = torch.tensor([1.0, 3.0, 3.0, 1.0]), pad
        self.register_buffer("k", (k[:, None] * k[None] / 64).expand(channels, 1, 4, 4).contiguous(), persistent=False)

    def forward(self, x):
        return F.conv2d(x, self.k.to(x.dtype), padding=self.pad, groups=x.shape[1])

def head(channels, width):
    """Official: BlurPool (pad 2) -> SN conv 3x3 stride 2 -> LeakyReLU(0.2) -> BlurPool (pad 1)
    -> SN conv 1x1 stride 2: patch logits, H -> H+1 -> H/2 -> H/2-1 -> H/4 (H a multiple of 4)."""
    sn = nn.utils.parametrizations.spectral_norm
    return nn.Sequential(Blur(channels, 2), sn(nn.Conv2d(channels, width, 3, 2, 0)), nn.LeakyReLU(0.2),
                         Blur(width, 1), sn(nn.Conv2d(width, 1, 1, 2)))

# tiny/mini: a small random trunk (timm arguments) and its embedding width
RANDOM_TRUNK = (dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)), 32)

class Discriminator(nn.Module):
    """C(x) in Eq. (7): a frozen CLIP ConvNeXt's first three stage maps and pooled embedding, each
    read by a trainable head; returns a list of logits (B, N_level)."""

    def __init__(self, random_net, width=512, ckpt=""):
        super().__init__()
        import open_clip, timm
        if random_net:  # the same timm ConvNeXt class and block structure, random weights
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                trunk = timm.create_model("convnext_xxlarge", pretrained=False, num_classes=0, **RANDOM_TRUNK[0])
                proj = nn.Linear(RANDOM_TRUNK[0]["dims"][-1], RANDOM_TRUNK[1], bias=False)
        else:  # paper: CLIP-ConvNeXt-XXLarge, LAION-2B (dims 384/768/1536/3072, embedding 1024)
            ckpt = ckpt or os.path.join(common.hub_snapshot(CLIP_HUB), "open_clip_pytorch_model.bin")  # checked
            clip = open_clip.create_model("convnext_xxlarge", pretrained=ckpt)
            trunk, proj = clip.visual.trunk, clip.visual.head.proj
        self.trunk, self.proj = trunk.requires_grad_(False).eval(), proj.requires_grad_(False).eval()
        self.heads = nn.ModuleList(head(f["num_chs"], width) for f in trunk.feature_info[:3])
        sn = nn.utils.parametrizations.spectral_norm
        self.pooled_head = nn.Sequential(sn(nn.Linear(proj.out_features, width)), nn.LeakyReLU(0.2),
                                         sn(nn.Linear(width, 1)))
        self.register_buffer("mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):  # the backbone stays in eval mode (no stochastic depth)
        super().train(mode)
        self.trunk.eval()
        return self

    def features(self, x):
        """Images in [0, 1] -> [stage 1, stage 2, stage 3 maps, pooled embedding]. The backbone is
        frozen: it records a graph only when the gradient must reach the input (the generator)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            h, feats = self.trunk.stem((x - self.mean) / self.std), []
            for i, stage in enumerate(self.trunk.stages):
                h = stage(h)
                if i < 3:
                    feats.append(h)
            return feats + [self.proj(self.trunk.forward_head(self.trunk.norm_pre(h)))]

    def logits(self, feats):
        return [hd(f).flatten(1) for hd, f in zip(self.heads, feats)] + [self.pooled_head(feats[-1])]

    def forward(self, x):
        return self.logits(self.features(x))

    def trainable(self):
        return [p for m in (self.heads, self.pooled_head) for p in m.parameters()]

# ------------------------------------------------------------ losses
def ragan_loss(d_real, d_fake, g_form=False):
    """Eq. (7): relativistic average GAN, D_Ra(a, b) = C(a) - mean_batch C(b), summed over levels.
    The D form pushes real above the average fake and fake below the average real; G swaps them."""
    bce = F.binary_cross_entropy_with_logits
    loss = 0.0
    for r, f in zip(d_real, d_fake):
        r, f = r.float(), f.float()
        ra_real, ra_fake = r - f.mean(0, keepdim=True), f - r.mean(0, keepdim=True)
        if g_form:
            loss = loss + 0.5 * (bce(ra_fake, torch.ones_like(ra_fake)) + bce(ra_real, torch.zeros_like(ra_real)))
        else:
            loss = loss + 0.5 * (bce(ra_real, torch.ones_like(ra_real)) + bce(ra_fake, torch.zeros_like(ra_fake)))
    return loss

def r1_loss(disc, x_real, d_real, noise_scale=0.005):
    """Eq. (8): mean ||C(x) - C(x + n)||^2 summed over levels, n ~ U[0, s) per pixel on [-1, 1]
    images (official): for small n, R1 along n without a double backward. d_real: disc(x_real),
    which the D step already has."""
    # official != paper: one-sided uniform (paper: Gaussian); / 2: s is on [-1, 1], x on [0, 1]
    n = torch.rand_like(x_real) * noise_scale / 2
    d_noisy = disc(x_real + n)
    return sum(((r.float() - q.float()) ** 2).mean() for r, q in zip(d_real, d_noisy))

# relu1_2, relu2_2, relu3_4, relu4_4, relu5_4 in torchvision's vgg19().features
VGG19_RELU = (3, 8, 17, 26, 35)

class FDLFeatures(nn.Module):
    """phi of Eq. (10): frozen VGG19 features, ImageNet weights from `weights` (a file; "": torch
    hub's cache; "random": random ones, the tiny and mini stand-in), and per layer the fixed random
    projections of the sliced Wasserstein distance (unit-norm 5x5 kernels over all channels)."""

    def __init__(self, weights="random", projections=256, kernel=5):
        super().__init__()
        import torchvision
        # VGG19's features
        vgg = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"])
        if weights != "random":
            sd = torch.load(weights or common.hub_file(common.VGG19_URL), map_location="cpu", weights_only=True)
            vgg.load_state_dict({k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")})
        self.vgg = vgg[:VGG19_RELU[-1] + 1].requires_grad_(False).eval()
        g = torch.Generator().manual_seed(0)
        for i, c in enumerate((64, 128, 256, 512, 512)):
            k = torch.randn(projections, c, kernel, kernel, generator=g)
            self.register_buffer(f"proj{i}", k / k.flatten(1).norm(dim=1).view(-1, 1, 1, 1), persistent=False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        h, out = (x - self.mean) / self.std, []
        for i, layer in enumerate(self.vgg):
            h = layer(h)
            if i in VGG19_RELU:
                out.append(h)
        return out

def sliced_wasserstein(a, b, kernels):
    """1-D Wasserstein distance between the spatial distributions of random projections, (B,)."""
    h, w = a.shape[-2:]
    # ours: maps smaller than the kernel (tiny crops only)
    if h < kernels.shape[-2] or w < kernels.shape[-1]:
        kernels = kernels[..., :h, :w]
        kernels = kernels / kernels.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    pa = F.conv2d(a, kernels).flatten(2).sort(-1).values
    pb = F.conv2d(b, kernels).flatten(2).sort(-1).values
    return (pa - pb).abs().mean((1, 2))

def fdl_loss(phi, x, y, phase_weight=1.0):
    """Eq. (10): per VGG layer, the DFT of the features split into amplitude and phase; sliced
    Wasserstein distance of each between x and y; summed over layers, mean over the batch."""
    loss = 0.0
    for i, (fx, fy) in enumerate(zip(phi(x), phi(y))):
        Fx, Fy, k = torch.fft.fft2(fx.float()), torch.fft.fft2(fy.float()), getattr(phi, f"proj{i}")
        loss = loss + sliced_wasserstein(Fx.abs(), Fy.abs(), k) + phase_weight * sliced_wasserstein(
            Fx.angle(), Fy.angle(), k)  # Eq. (10)
    return loss.mean()

def strsr_losses(dit, vae, cond, disc, lpips, phi, family, x_lr, x_hr, cfg):
    """One training step: L_Gen (Eq. 11) and, on its detached output, L_Dis (Eq. 9), on disjoint
    parameters: D's heads are frozen (and in eval mode, official) in the G pass; the D pass reuses
    its backbone features, detached. Returns (L_Gen + L_Dis, terms, x_sr)."""
    with torch.no_grad():
        z_lr = lr_latent(vae, family, x_lr)                           # Eq. (6)
    z0_hat = one_step(dit, family, z_lr, cond(x_lr), cfg.t_star)     # Eqs. (5), (6)
    x_sr = common.decode(vae, family, z0_hat)
    terms = {"l1": F.l1_loss(x_sr.float() * 2 - 1, x_hr * 2 - 1)}   # official: on [-1, 1] images
    if cfg.w_lpips:  # VGG is most of a small model's step: skipped when its weight is 0
        terms["lpips"] = lpips(x_sr.float(), x_hr)
    w_fdl = cfg.w_fdl if cfg.stage == "2" else 0.0
    if w_fdl:  # official != FDL's convention: [-1, 1] images (--fdl_01: [0, 1])
        to = (lambda x: x) if cfg.fdl_01 else (lambda x: x * 2 - 1)
        terms["fdl"] = fdl_loss(phi, to(x_sr.float()), to(x_hr), cfg.fdl_phase)
    if cfg.w_gan:
        with torch.no_grad():
            # frozen backbone, once per batch
            feats_real = disc.features(x_hr)
        # L_G reaches the generator only; official: no power iteration
        with common.frozen(disc, eval_mode=True):
            feats_fake = disc.features(x_sr)
            # Eq. (7), G form
            terms["gan"] = ragan_loss(disc.logits(feats_real), disc.logits(feats_fake), g_form=True)
    loss_g = (cfg.w_l1 * terms["l1"] + cfg.w_lpips * terms.get("lpips", 0.0) + cfg.w_gan * terms.get("gan", 0.0)
              + w_fdl * terms.get("fdl", 0.0))  # Eq. (11)
    if not cfg.w_gan:  # no discriminator (Table 4's w/o GAN; the mini)
        return loss_g, {"loss": loss_g, **terms}, x_sr
    d_real = disc.logits(feats_real)
    d_gan = ragan_loss(d_real, disc.logits([f.detach() for f in feats_fake]))  # Eq. (7), D form
    r1 = r1_loss(disc, x_hr, d_real, cfg.r1_noise)                    # Eq. (8)
    loss_d = d_gan + cfg.w_r1 * r1                                    # Eq. (9)
    return loss_g + loss_d, {"loss": loss_g, **terms, "d": loss_d, "d_gan": d_gan, "r1": r1}, x_sr

# ------------------------------------------------------------ sampler
def build_sampler(flags, device=None):
    """fn(x_lr (1, 3, h, w) in [0, 1]) -> (1, 3, 4h, 4w) of the checkpoint flags.ckpt: bicubic x4,
    pad to 16, one step (tiled in latent space for large inputs, the VLM condition computed once on
    the whole LR), crop back. flags.seed seeds the only randomness, the draw of z_lr."""
    path, cfg, device, dtype = common.sampler_setup(flags, resolve, pretrained, device)
    dit, vae, cond = build_generator(cfg, device, ckpt=path, dtype=dtype)
    common.load_checkpoint(path, {"dit": dit, "cond": cond}, ema=cfg.ema)
    dit = common.sampling_weights(cfg, dtype, dit)
    dit.eval()
    cond.eval()
    family = common.PRESETS[cfg.model].family
    f = 16 if family == "flux2" else 8  # pixels per latent cell: VAE x8, FLUX.2 patchified x2
    tile, overlap = cfg.tile or 1024 // f, cfg.overlap or 64 // f

    def sr(x_lr):
        def latent(z_lr):
            c = cond(x_lr.to(device).float())  # once, on the whole LR image
            return common.tiled(lambda z: one_step(dit, family, z, c, cfg.t_star, cfg.steps),
                                release_latent(vae, family, z_lr), tile, overlap)
        # official: z_lr a draw of the latent distribution
        g = torch.Generator(device).manual_seed(cfg.seed)
        return common.super_resolve(vae, family, x_lr, latent, g)
    sr.cond = cond  # for inspection (tests: the VLM runs once per image)
    return common.finish_sampler(sr, cfg)

# ------------------------------------------------------------ training
def resume_stage(cfg, models, optimizers, log):
    """(step, the step this stage started at): resume this run, continue a stage-1 run into stage 2
    in the same out_dir, or start stage 2 from --init_ckpt."""
    ckpt = common.latest_checkpoint(cfg.out_dir)
    if ckpt:
        state = common.load_checkpoint(ckpt, models, optimizers)
        prev = common.load_config(ckpt).get("stage", "1")
        if prev > cfg.stage:
            raise SystemExit(f"{ckpt} is a stage-{prev} checkpoint; --stage {cfg.stage} cannot resume it")
        log(f"resumed {ckpt} at step {state['step']}" + (" (stage 1 -> stage 2)" if prev != cfg.stage else ""))
        return state["step"], state.get("stage_start", 0) if prev == cfg.stage else state["step"]
    if cfg.init_ckpt:
        init = common.latest_checkpoint(cfg.init_ckpt)
        if init is None:
            raise SystemExit(f"--init_ckpt {cfg.init_ckpt!r}: no checkpoint there")
        common.load_checkpoint(init, models)
        log(f"initialised from {init}")
    elif cfg.stage == "2":
        raise SystemExit("--stage 2 starts from a stage-1 run: use its --out_dir, or --init_ckpt DIR")
    elif cfg.zero_init:  # v = 0: the first step returns z_lr, bicubic (ours: the mini)
        common.zero_output(models["dit"])
    return 0, 0

def train(cfg):
    cfg = resolve(cfg)
    rank, world, device, log = common.setup(cfg, pretrained(cfg))
    family, random_nets = common.PRESETS[cfg.model].family, common.PRESETS[cfg.model].hub is None

    # 1. models: the LoRA, condition MLP and D heads train, the rest is frozen; no D with --w_gan 0
    with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank
        torch.manual_seed(cfg.seed)
        dit, vae, cond = build_generator(cfg, device)
        disc = Discriminator(random_nets, cfg.disc_width, cfg.disc_ckpt).to(device) if cfg.w_gan else None
        lpips = common.load_lpips(device, "random" if random_nets else cfg.lpips_weights) if cfg.w_lpips else None
        phi = FDLFeatures("random" if random_nets else cfg.fdl_weights, cfg.fdl_projections).to(device) \
            if cfg.stage == "2" else None
    common.checkpointing(cfg, device, dit, vae)
    if cfg.grad_ckpt and device.type == "cuda" and disc:
        disc.trunk.set_grad_checkpointing(True)
    if cfg.fsdp:
        dit = common.shard_fsdp2(dit, log)

    # 2. optimizers: AdamW with the default betas, separate learning rates (Sec. 4.1)
    opts = {"g": torch.optim.AdamW(common.trainable(dit, cond), lr=cfg.lr, weight_decay=cfg.weight_decay)}
    models = {"dit": dit, "cond": cond}
    if disc:
        opts["d"] = torch.optim.AdamW(disc.trainable(), lr=cfg.lr_d, weight_decay=cfg.weight_decay)
        models["disc"] = disc

    # 3. resume, or continue stage 1 into stage 2
    step, first = resume_stage(cfg, models, opts, log)

    # 4. data: HR crops; the LR made on the device by the degradation (Real-ESRGAN unless --degrade)
    loader, accum = make_loader(ImageDataset(cfg.data, cfg.crop, cfg.data_root), cfg, rank, world, step)

    # 5. loop: each micro-batch seeded by its place in the run (the same draws after a resume, on
    # any number of ranks); L_Gen + L_Dis (Eqs. 11, 9) back-propagated, then both optimizers step
    for m in models.values():
        m.train()
    saved = {"stage_start": first}  # where this stage began: its lr schedule, after a resume
    end, scale = first + cfg.max_steps, 1 / accum
    import eval  # the held-out scores: --val_every, and --eval_heldout at the end
    val = eval.validation("strsr", build_sampler, cfg, device) if rank == 0 and cfg.val_every else None
    ema = common.start_ema(cfg, models)
    log.start_clock()
    while step < end:
        sums = {}
        for j in range(accum):
            torch.manual_seed(common.micro_batch_seed(cfg.seed, step + 1, rank * accum + j))
            x_lr, x_hr = degrade(next(loader).to(device), 4, DEGRADE[cfg.degrade])
            with common.autocast(device):
                loss, terms, x_sr = strsr_losses(dit, vae, cond, disc, lpips, phi, family, x_lr, x_hr, cfg)
            (loss * scale).backward()
            sums = {k: sums.get(k, 0) + v.detach() / accum for k, v in terms.items()}
        # the schedule counts this stage
        common.set_lr(opts.values(), step + 1 - first, end - first, cfg.lr_decay)
        norms = common.optimizer_step(opts.values(), cfg.grad_clip)
        if ema:
            ema.update()
        step += 1
        log.step(step, end, sums, cfg.log_every, opts, norms)
        if log.master and common.due(step, cfg.grid_every, end):
            log.image("grid", common.save_grid(cfg.out_dir, step, x_lr, x_sr, x_hr), step)
        if common.due(step, cfg.save_every, end):
            common.save_checkpoint(cfg.out_dir, step, cfg, models, opts, saved, ema=ema)
        if cfg.val_every and step % cfg.val_every == 0:
            common.validate(cfg, step, models, saved, ema, val, log)
    if log.master:
        common.plot_curves(cfg.out_dir)
    if rank == 0 and cfg.eval_heldout:
        eval.heldout("strsr", build_sampler, cfg.out_dir, cfg.degrade, cfg.data_root)

if __name__ == "__main__":
    cfg = common.parse_config(Config)
    if cfg.sample:
        common.sample_files(build_sampler(cfg), cfg.input, cfg.output)
    else:
        train(cfg)
    common.cleanup()
