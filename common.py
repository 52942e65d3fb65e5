"""
What the four method scripts share and none of the papers describes: the base-model
table and loaders, each family's latent convention and velocity call, prompt
embeddings, data, distributed setup, checkpoints, tiled inference, config and logging.

Every velocity call here speaks one convention (rectified flow, sigma form):
    z_t = (1 - t) * z_0 + t * eps,   t in [0, 1],   v = eps - z_0,   Euler: z_s = z_t - (t - s) * v
on (B, C, H, W) latents, whatever the family does inside (packing, position ids, its
own timestep scale). Images are (B, 3, H, W) floats in [0, 1] everywhere outside the VAE.
"""
import contextlib, dataclasses, glob, hashlib, json, os, random, shutil, sys, time, warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

# --------------------------------------------------------------------------- presets
# One row per base. `dit`/`vae` hold a tiny random config of the same classes for the
# tiny presets (hub None); real presets load from the hub id. Every family takes pixels
# in multiples of 16: VAE factor 8 x patch 2 (FLUX.2 patchifies 2x2 in latent space).
FAMILIES = {  # family: (transformer class, VAE class, pipeline class)
    "flux1": ("FluxTransformer2DModel", "AutoencoderKL", "FluxPipeline"),
    "flux2": ("Flux2Transformer2DModel", "AutoencoderKLFlux2", "Flux2KleinPipeline"),
    "zimage": ("ZImageTransformer2DModel", "AutoencoderKL", "ZImagePipeline"),
    "sd3": ("SD3Transformer2DModel", "AutoencoderKL", "StableDiffusion3Pipeline"),
    "qwen": ("QwenImageTransformer2DModel", "AutoencoderKLQwenImage", "QwenImagePipeline"),
}
PIXEL_MULTIPLE = 16
_KL4 = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)


@dataclasses.dataclass(frozen=True)
class Preset:
    family: str
    hub: str | None  # hub id (real) or None (tiny random)
    size: str        # transformer parameters, for the README table
    dit: dict | None = None
    vae: dict | None = None


PRESETS = {
    "flux1-dev": Preset("flux1", "black-forest-labs/FLUX.1-dev", "12B"),
    "flux2-klein": Preset("flux2", "black-forest-labs/FLUX.2-klein-4B", "4B"),
    "zimage": Preset("zimage", "Tongyi-MAI/Z-Image-Turbo", "6B"),
    "sd35-medium": Preset("sd3", "stabilityai/stable-diffusion-3.5-medium", "2.5B"),
    "qwen-image": Preset("qwen", "Qwen/Qwen-Image-2512", "20B"),
    "tiny-flux1": Preset("flux1", None, "81k", dict(
        in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        dict(_KL4, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)),
    "tiny-flux2": Preset("flux2", None, "69k", dict(
        in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False),
        dict(_KL4, latent_channels=32)),
    "tiny-zimage": Preset("zimage", None, "348k", dict(
        in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
        axes_dims=[4, 6, 6], axes_lens=[256, 128, 128]),
        dict(_KL4, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)),
    "tiny-sd3": Preset("sd3", None, "80k", dict(
        sample_size=32, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=16,
        pos_embed_max_size=64),
        dict(_KL4, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)),
    "tiny-qwen": Preset("qwen", None, "92k", dict(
        in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
        dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)),
}


def resolve_preset(model, default):
    """`--model tiny` picks the tiny preset of the method's default family."""
    if model == "tiny":
        return "tiny-" + PRESETS[default].family
    if model not in PRESETS:
        raise SystemExit(f"unknown --model {model!r}; choose from tiny, {', '.join(PRESETS)}")
    return model


def _source(preset, path, sub):
    """Hub id or local folder; a pipeline folder (or the hub repo) keeps each model in a subfolder."""
    src = path or PRESETS[preset].hub
    return src, (sub if path is None or os.path.isdir(os.path.join(src, sub)) else None)


def _build(cls_name, preset, path, sub, config, dtype):
    import diffusers
    cls = getattr(diffusers, cls_name)
    if path is None and PRESETS[preset].hub is None:
        with torch.random.fork_rng(devices=[]):  # tiny weights: random but the same every run
            torch.manual_seed(0)
            m = cls(**config)
            return m if dtype == torch.float32 else m.to(dtype)
    src, sub = _source(preset, path, sub)
    return cls.from_pretrained(src, subfolder=sub, torch_dtype=dtype)


def load_dit(preset, path=None, dtype=torch.float32):
    return _build(FAMILIES[PRESETS[preset].family][0], preset, path, "transformer", PRESETS[preset].dit, dtype)


def load_vae(preset, path=None, dtype=torch.float32):
    vae = _build(FAMILIES[PRESETS[preset].family][1], preset, path, "vae", PRESETS[preset].vae, dtype)
    vae.requires_grad_(False).eval()
    return vae


# --------------------------------------------------------------------------- latents
def patchify(z):  # (B, C, H, W) -> (B, 4C, H/2, W/2), channel order (C, 2, 2) as FLUX.2
    B, C, H, W = z.shape
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, C * 4, H // 2, W // 2)


def unpatchify(z):
    B, C, H, W = z.shape
    return z.view(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, H * 2, W * 2)


def _stats(vae, family, z):
    """(mean, std) that normalise this family's raw VAE latents, broadcastable to z."""
    c = vae.config
    if family == "qwen":
        return (torch.tensor(c.latents_mean).view(1, -1, 1, 1).to(z),
                torch.tensor(c.latents_std).view(1, -1, 1, 1).to(z))
    if family == "flux2":  # BatchNorm running stats of the patchified latents
        return vae.bn.running_mean.view(1, -1, 1, 1).to(z), (vae.bn.running_var.view(1, -1, 1, 1) + c.batch_norm_eps).sqrt().to(z)
    return torch.full_like(z[:1, :1, :1, :1], c.shift_factor or 0.0), torch.full_like(z[:1, :1, :1, :1], 1 / c.scaling_factor)


def encode(vae, family, x):
    """Images in [0, 1] -> normalised latents (B, C, H/8, W/8) (FLUX.2: (B, 128, H/16, W/16))."""
    x = (x * 2 - 1).to(vae.dtype)
    if family == "qwen":  # video VAE: one frame
        z = vae.encode(x.unsqueeze(2)).latent_dist.mode()[:, :, 0]
    else:
        z = vae.encode(x).latent_dist.mode()
    if family == "flux2":
        z = patchify(z)
    mean, std = _stats(vae, family, z)
    return ((z - mean) / std).float()


def decode(vae, family, z):
    """Normalised latents -> images in [0, 1] (not clamped, so losses keep their gradient)."""
    mean, std = _stats(vae, family, z)
    z = (z * std + mean).to(vae.dtype)
    if family == "flux2":
        z = unpatchify(z)
    x = vae.decode(z.unsqueeze(2)).sample[:, :, 0] if family == "qwen" else vae.decode(z).sample
    return (x.float() + 1) / 2


# --------------------------------------------------------------------------- velocity
def pack(z):  # (B, C, H, W) -> (B, H/2 * W/2, 4C): FLUX.1 / Qwen-Image 2x2 tokens
    B, C, H, W = z.shape
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)


def unpack(x, H, W):
    B, N, D = x.shape
    return x.view(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, H, W)


def grid_ids(h, w, ndim, device):
    """Position ids (h*w, ndim) = (0, row, col[, 0]) for image tokens."""
    ii, jj = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ids = torch.zeros(h * w, ndim, device=device)
    ids[:, 1], ids[:, 2] = ii.flatten(), jj.flatten()
    return ids


def velocity(family, dit, z, t, cond, guidance=3.5):
    """v(z_t, t) with v = eps - z_0, for z_t (B, C, H, W) and t (B,) in [0, 1]."""
    B, C, H, W = z.shape
    t = t.expand(B) if t.numel() == 1 else t
    dt, emb = dit.dtype, cond["embeds"].to(dit.dtype)
    if family == "flux1":
        out = dit(hidden_states=pack(z).to(dt), encoder_hidden_states=emb, pooled_projections=cond["pooled"].to(dt),
                  timestep=t.to(dt), img_ids=grid_ids(H // 2, W // 2, 3, z.device),
                  txt_ids=torch.zeros(emb.shape[1], 3, device=z.device),
                  guidance=torch.full((B,), guidance, device=z.device) if dit.config.guidance_embeds else None,
                  return_dict=False)[0]
        return unpack(out.float(), H, W)
    if family == "flux2":
        txt_ids = torch.zeros(B, emb.shape[1], 4, device=z.device)
        txt_ids[..., 3] = torch.arange(emb.shape[1], device=z.device)
        out = dit(hidden_states=z.flatten(2).transpose(1, 2).to(dt), encoder_hidden_states=emb, timestep=t.to(dt),
                  img_ids=grid_ids(H, W, 4, z.device).expand(B, -1, -1), txt_ids=txt_ids,
                  guidance=torch.full((B,), guidance, device=z.device) if dit.config.guidance_embeds else None,
                  return_dict=False)[0]
        return out.float().transpose(1, 2).reshape(B, C, H, W)
    if family == "zimage":  # takes 1 - sigma, a list of (C, 1, H, W), and returns -v
        out = dit(list(z.to(dt).unsqueeze(2).unbind(0)), (1 - t).to(dt), list(emb.unbind(0)), return_dict=False)[0]
        return -torch.stack(out)[:, :, 0].float()
    if family == "sd3":  # takes sigma * 1000
        return dit(hidden_states=z.to(dt), encoder_hidden_states=emb, pooled_projections=cond["pooled"].to(dt),
                   timestep=(t * 1000).to(dt), return_dict=False)[0].float()
    if family == "qwen":
        out = dit(hidden_states=pack(z).to(dt), encoder_hidden_states=emb, encoder_hidden_states_mask=cond["mask"],
                  timestep=t.to(dt), img_shapes=[[(1, H // 2, W // 2)]] * B, return_dict=False)[0]
        return unpack(out.float(), H, W)
    raise ValueError(family)


# --------------------------------------------------------------------------- prompts
def expand_cond(cond, B):
    return {k: v.expand(B, *v.shape[1:]) for k, v in cond.items()}


def tiny_cond(dit, family, length=8):
    """Fixed random 'prompt embeddings' of the right shape for the tiny presets."""
    c, g = dit.config, torch.Generator().manual_seed(1234)
    width = c.cap_feat_dim if family == "zimage" else c.joint_attention_dim
    cond = {"embeds": torch.randn(1, length, width, generator=g)}
    if family in ("flux1", "sd3"):
        cond["pooled"] = torch.randn(1, c.pooled_projection_dim, generator=g)
    if family == "qwen":
        cond["mask"] = torch.ones(1, length, dtype=torch.long)
    return cond


def prompt_cond(preset, prompt, cache_dir, device, path=None):
    """Encode a prompt once with the family's own text encoders, cache it, free the encoders."""
    from safetensors.torch import load_file, save_file
    family = PRESETS[preset].family
    key = hashlib.sha1(f"{preset}|{path}|{prompt}".encode()).hexdigest()[:16]
    file = os.path.join(cache_dir, f"prompt-{family}-{key}.safetensors")
    if os.path.exists(file):
        return {k: v.to(device) for k, v in load_file(file).items()}
    import diffusers
    src = path or PRESETS[preset].hub
    pipe = getattr(diffusers, FAMILIES[family][2]).from_pretrained(
        src, transformer=None, vae=None, torch_dtype=torch.bfloat16).to(device)
    with torch.no_grad():
        if family == "flux1":
            e, p, _ = pipe.encode_prompt(prompt, prompt_2=None, device=device)
            cond = {"embeds": e, "pooled": p}
        elif family == "flux2":
            cond = {"embeds": pipe.encode_prompt(prompt, device=device)[0]}
        elif family == "zimage":  # a list of (L, D), unpadded
            cond = {"embeds": pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)[0][0][None]}
        elif family == "sd3":
            e, _, p, _ = pipe.encode_prompt(prompt, None, None, device=device, do_classifier_free_guidance=False)
            cond = {"embeds": e, "pooled": p}
        else:
            e, m = pipe.encode_prompt(prompt, device=device)
            cond = {"embeds": e, "mask": m if m is not None else torch.ones(e.shape[:2], dtype=torch.long)}
    del pipe
    cond = {k: v.float().cpu().contiguous() for k, v in cond.items()}
    os.makedirs(cache_dir, exist_ok=True)
    save_file(cond, file + ".tmp")
    os.replace(file + ".tmp", file)
    return {k: v.to(device) for k, v in cond.items()}


# --------------------------------------------------------------------------- LoRA
def add_lora(dit, rank, alpha, targets, init="gaussian"):
    """Inject a peft LoRA into the (frozen) transformer; only the LoRA weights train, in fp32."""
    from peft import LoraConfig
    dit.requires_grad_(False)
    dit.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=targets))
    for p in dit.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return dit


def lora_state(dit):
    """LoRA weights in the diffusers format that `pipe.load_lora_weights` accepts."""
    from peft.utils import get_peft_model_state_dict
    return {"transformer." + k: v.detach().contiguous() for k, v in get_peft_model_state_dict(dit).items()}


def load_lora_state(dit, sd):
    from peft.utils import set_peft_model_state_dict
    res = set_peft_model_state_dict(dit, {k.removeprefix("transformer."): v for k, v in sd.items()})
    if getattr(res, "unexpected_keys", None):
        raise KeyError(f"LoRA keys that match no module: {res.unexpected_keys[:5]}")


# --------------------------------------------------------------------------- data
IMG_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
NAMED_DATASETS = {"LSDIR": "LSDIR", "FFHQ": "FFHQ", "Aesthetic-4K": "Aesthetic-4K", "DIV2K": "DIV2K"}
# Real photos shipped inside the scikit-image wheel (offline). astronaut is held out for eval.
SAMPLE_PHOTOS = ["coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "camera",
                 "coins", "brick", "grass", "gravel", "moon", "text", "stereo_motorcycle"]
SAMPLE_HELDOUT = ["astronaut"]


def to_rgb(img):
    """PIL image of any mode (gray, RGBA, palette, 16-bit) -> float (3, H, W) in [0, 1]."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float32) / (65535.0 if img.mode != "I" or np.asarray(img).max() > 255 else 255.0)
        return torch.from_numpy(np.clip(a, 0, 1)).expand(3, -1, -1).clone()
    if img.mode in ("RGBA", "LA", "P", "PA"):  # composite transparency over white
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def load_image(path):
    with Image.open(path) as img:
        return to_rgb(img)


def save_image(x, path):
    """(3, H, W) or (1, 3, H, W) in [0, 1] -> 8-bit file."""
    x = x.detach().float().squeeze(0).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(x).save(path)


def sample_photos(names=SAMPLE_PHOTOS):
    import skimage.data
    out = []
    for n in names:
        a = getattr(skimage.data, n)()
        a = a[0] if isinstance(a, tuple) else a  # stereo pair: left view
        out.append(to_rgb(Image.fromarray(a)))
    return out


def list_images(src, data_root="data"):
    """`src` is a folder (recursive), a text file of paths, or a dataset name under data_root."""
    if src in NAMED_DATASETS:
        src = os.path.join(data_root, NAMED_DATASETS[src])
        if not os.path.isdir(src):
            raise SystemExit(f"dataset folder {src} not found: download it there (see README, Datasets)")
    if os.path.isfile(src) and not src.lower().endswith(IMG_EXTS):
        with open(src) as f:
            files = [l.strip() for l in f if l.strip()]
    elif os.path.isdir(src):
        files = sorted(p for p in glob.glob(os.path.join(src, "**", "*"), recursive=True) if p.lower().endswith(IMG_EXTS))
    elif os.path.isfile(src):
        files = [src]
    else:
        raise SystemExit(f"--data {src!r}: no such folder, file list or dataset name")
    if not files:
        raise SystemExit(f"--data {src!r}: no images ({', '.join(IMG_EXTS)}) found")
    return files


class ImageDataset(torch.utils.data.Dataset):
    """Random crop + flip of an image source. Items are keyed by (index, seed), so a crop is a
    pure function of the data position: resume and any number of ranks see the same samples."""

    def __init__(self, src="sample", crop=512, data_root="data"):
        self.crop = crop
        self.items = sample_photos() if src == "sample" else list_images(src, data_root)
        self.bad, self.warned = set(), set()

    def __len__(self):
        return len(self.items)

    def _read(self, i):
        item = self.items[i]
        if torch.is_tensor(item):
            return item
        try:
            return load_image(item)
        except Exception as e:  # unreadable: skip, say so once
            if item not in self.bad:
                self.bad.add(item)
                print(f"warning: skipping unreadable image {item}: {e}", file=sys.stderr)
            return None

    def __getitem__(self, key):
        i, seed = key
        g = torch.Generator().manual_seed(seed)
        for _ in range(len(self.items)):  # fall through to the next image if this one is unreadable
            x = self._read(i)
            if x is not None:
                break
            i = (i + 1) % len(self.items)
        else:
            raise RuntimeError("no readable image in the data source")
        H, W = x.shape[1:]
        if min(H, W) < self.crop:  # upscale small images, once-per-image warning
            if i not in self.warned:
                self.warned.add(i)
                print(f"warning: image {i} is {W}x{H}, smaller than crop {self.crop}: upscaling", file=sys.stderr)
            s = self.crop / min(H, W)
            x = F.interpolate(x[None], size=(max(self.crop, round(H * s)), max(self.crop, round(W * s))),
                              mode="bicubic", align_corners=False)[0].clamp(0, 1)
            H, W = x.shape[1:]
        top = int(torch.randint(0, H - self.crop + 1, (1,), generator=g))
        left = int(torch.randint(0, W - self.crop + 1, (1,), generator=g))
        x = x[:, top:top + self.crop, left:left + self.crop]
        if torch.rand(1, generator=g) < 0.5:
            x = x.flip(-1)
        return x


class StepSampler(torch.utils.data.Sampler):
    """Infinite, resumable, rank-aware sampler (what DistributedSampler does, plus an exact
    data position): the global batch of step s is positions [s*GB, (s+1)*GB), shuffled per
    epoch with seed + epoch; rank r takes its contiguous share of each global batch."""

    def __init__(self, n, global_batch, rank, world, seed, start_step=0):
        assert global_batch % world == 0, "global batch must divide by the number of ranks"
        self.n, self.gb, self.rank, self.world, self.seed, self.start = n, global_batch, rank, world, seed, start_step
        self._perm = (None, None)

    def _index(self, pos):
        epoch = pos // self.n
        if self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)))
        return int(self._perm[1][pos % self.n])

    def __iter__(self):
        per = self.gb // self.world
        step = self.start
        while True:
            for j in range(per):
                pos = step * self.gb + self.rank * per + j
                yield self._index(pos), self.seed * 1_000_003 + pos
            step += 1


def make_loader(data, crop, data_root, batch, micro, rank, world, seed, start_step, workers=2):
    """Per-rank loader of micro-batches; `batch` is the global batch (split over ranks and
    gradient-accumulation steps)."""
    ds = ImageDataset(data, crop, data_root)
    assert batch % (world * micro) == 0, f"batch {batch} must divide by world {world} x micro_batch {micro}"
    sampler = StepSampler(len(ds), batch, rank, world, seed, start_step)
    # its own generator: a DataLoader otherwise draws a seed from the global RNG, which
    # would make a resumed run diverge from an uninterrupted one
    return iter(torch.utils.data.DataLoader(ds, batch_size=micro, sampler=sampler, num_workers=workers,
                                            persistent_workers=workers > 0, generator=torch.Generator())), batch // (world * micro)


# --------------------------------------------------------------------------- distributed
def compute_init(seed=0):
    """(ddp, rank, local_rank, world, device). RANK in the environment means torchrun."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(seed * world + rank)  # DiT-style per-rank seed
    random.seed(seed * world + rank)
    return ddp, rank, local, world, device


def allreduce_grads(params):
    """Average the gradients of the trainable parameters over ranks. This is DDP's reduction,
    done by hand because every method calls the model several times per step in different
    roles, which DDP's reducer does not allow. FSDP-sharded (DTensor) grads are left to FSDP."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in params if p.grad is not None and type(p.grad) is torch.Tensor]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, f in zip(grads, torch.split(flat, [g.numel() for g in grads])):
            g.copy_(f.view_as(g))


def optimizer_step(groups, optimizers, clip):
    """One update: gradients averaged over ranks in one collective, each group clipped to norm
    `clip`, each optimizer stepped and cleared. groups[i] are the parameters of optimizers[i]."""
    allreduce_grads([p for group in groups for p in group])
    for group, opt in zip(groups, optimizers):
        torch.nn.utils.clip_grad_norm_(group, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def reduce_mean(stats):
    """Average a dict of floats over ranks (for logging)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return stats
    t = torch.tensor(list(stats.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(stats, (t / dist.get_world_size()).tolist()))


def shard_fsdp2(dit):
    """FSDP2 for bases that do not fit one GPU: shard each transformer block, then the root."""
    from torch.distributed.fsdp import fully_shard
    for name in ("transformer_blocks", "single_transformer_blocks", "layers"):
        for block in getattr(dit, name, []):
            fully_shard(block)
    return fully_shard(dit)


def autocast(device, enabled=True):
    """bf16 autocast on GPU; full precision on CPU (bf16 matmuls are slow there)."""
    return torch.autocast("cuda", torch.bfloat16) if enabled and device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- checkpoints
def _trainable_state(m):
    """Everything a module learns: trainable params and buffers (e.g. spectral-norm vectors),
    never its frozen weights; LoRA weights are stored separately in the diffusers format."""
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    return {k: v.detach().contiguous() for k, v in m.state_dict().items() if k not in frozen and "lora_" not in k}


def save_checkpoint(out_dir, step, config, models, optimizers, extra=None, generators=None, keep=2):
    """Atomic: all files go into a temp folder that is renamed into place when complete; every
    rank adds its RNG state (global and the named `generators`). Call on every rank."""
    from safetensors.torch import save_file
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    final, tmp = os.path.join(out_dir, f"ckpt-{step:07d}"), os.path.join(out_dir, f".tmp-ckpt-{step:07d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if world > 1:
        dist.barrier()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           **{f"gen_{k}": g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(tmp, f"rng-{rank}.pt"))
    if rank == 0:
        for name, m in models.items():
            if getattr(m, "peft_config", None):
                save_file(lora_state(m), os.path.join(tmp, "pytorch_lora_weights.safetensors" if name == "dit" else f"{name}_lora.safetensors"),
                          metadata={"lora_config": json.dumps(m.peft_config["default"].to_dict(), default=list)})
            sd = _trainable_state(m)
            if sd:
                save_file(sd, os.path.join(tmp, f"{name}.safetensors"))
        torch.save({"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                    **(extra or {})}, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config, f, indent=1)
    if world > 1:
        dist.barrier()
    if rank == 0:
        os.replace(tmp, final)
        for old in sorted(glob.glob(os.path.join(out_dir, "ckpt-*")))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return final


def latest_checkpoint(path):
    """`path` is a checkpoint folder or an output folder holding ckpt-* folders (latest wins)."""
    if path and os.path.exists(os.path.join(path, "state.pt")):
        return path
    found = sorted(glob.glob(os.path.join(path, "ckpt-*"))) if path else []
    return found[-1] if found else None


def load_checkpoint(ckpt, models, optimizers=None, generators=None, restore_rng=True):
    """Load what save_checkpoint wrote; returns the state dict (step, extras). Loading never
    executes code: safetensors for weights, torch.load(weights_only=True) for the rest."""
    from safetensors.torch import load_file
    for name, m in models.items():
        lora = os.path.join(ckpt, "pytorch_lora_weights.safetensors" if name == "dit" else f"{name}_lora.safetensors")
        if os.path.exists(lora):
            load_lora_state(m, load_file(lora))
        file = os.path.join(ckpt, f"{name}.safetensors")
        if os.path.exists(file):
            missing, unexpected = m.load_state_dict(load_file(file), strict=False)
            if unexpected:
                raise KeyError(f"{file}: keys that match nothing in {name}: {unexpected[:5]}")
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    for k, o in (optimizers or {}).items():
        o.load_state_dict(state["optimizers"][k])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = os.path.join(ckpt, f"rng-{rank}.pt")
    if restore_rng and os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(_tuplify(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        for k, g in (generators or {}).items():
            g.set_state(rng[f"gen_{k}"])
    return state


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_config(ckpt):
    with open(os.path.join(ckpt, "config.json")) as f:
        return json.load(f)


def checkpoint_config(ckpt, cls):
    """A sampler's start: (folder, config) of the latest checkpoint under ckpt (a ckpt-* folder or an
    out_dir holding them), the config as the dataclass `cls` (fields it no longer has are ignored)."""
    found = latest_checkpoint(ckpt)
    if not found:
        raise SystemExit(f"--ckpt {ckpt!r}: no checkpoint (a ckpt-* folder or an out_dir holding them)")
    names = {f.name for f in dataclasses.fields(cls)}
    return found, cls(**{k: v for k, v in load_config(found).items() if k in names})


# --------------------------------------------------------------------------- tiling
def pad_to_multiple(x, m=PIXEL_MULTIPLE):
    """Reflect-pad right/bottom to a multiple of m; returns (padded, (H, W)) to crop back."""
    H, W = x.shape[-2:]
    ph, pw = (-H) % m, (-W) % m
    if ph or pw:
        mode = "reflect" if ph < H and pw < W else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (H, W)


def _starts(size, tile, stride):
    if size <= tile:
        return [0]
    s = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(s))


def tiled(fn, z, tile, overlap):
    """Apply a latent->latent function over overlapping tiles of (B, C, H, W), blending with
    linear ramps that reach 0 at a tile's inner edges, so memory is bounded by the tile. For
    a function of receptive radius 1 (a 3x3 conv) this equals fn(z) exactly; for a DiT it is
    the usual approximation, better with more overlap."""
    B, C, H, W = z.shape
    if H <= tile and W <= tile:
        return fn(z)
    assert 2 <= overlap <= tile // 2, "tiling needs 2 <= overlap <= tile / 2"
    out, wsum = None, torch.zeros(1, 1, H, W, device=z.device)
    for top in _starts(H, tile, tile - overlap):
        for left in _starts(W, tile, tile - overlap):
            th, tw = min(tile, H), min(tile, W)
            y = fn(z[:, :, top:top + th, left:left + tw])
            if out is None:
                out = torch.zeros(B, y.shape[1], H, W, device=z.device, dtype=y.dtype)
            w = _ramp(th, overlap, top > 0, top + th < H, z.device)[:, None] * _ramp(tw, overlap, left > 0, left + tw < W, z.device)[None]
            out[:, :, top:top + th, left:left + tw] += y * w
            wsum[:, :, top:top + th, left:left + tw] += w
    return out / wsum


def _ramp(n, overlap, rise, fall, device):
    w = torch.ones(n, device=device)
    r = torch.linspace(0, 1, overlap, device=device)
    if rise:
        w[:overlap] = r
    if fall:
        w[n - overlap:] = torch.minimum(w[n - overlap:], r.flip(0))
    return w


def upsample_lr(x_lr, scale=4):
    """The papers' LR input: bicubic upsampling to the HR size."""
    return F.interpolate(x_lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


@torch.no_grad()
def super_resolve(vae, family, x_lr, latent_fn):
    """The frame every sampler shares: x_lr (1, 3, h, w) in [0, 1] -> bicubic x4, padded to the model
    multiple, encoded; latent_fn(z_lr) -> z_0 (the method); decoded, cropped back to (4h, 4w)."""
    device = next(vae.parameters()).device
    x, (H, W) = pad_to_multiple(upsample_lr(x_lr.to(device).float()))
    with autocast(device):
        z_0 = latent_fn(encode(vae, family, x))
        return decode(vae, family, z_0)[..., :H, :W].clamp(0, 1).float().cpu()


def tiled_pair(fn, z, z_lr, tile, overlap):
    """tiled() for fn(z, z_lr) of two aligned latents (the LR-conditioned DiTs): each tile sees its own
    slice of both."""
    C = z.shape[1]
    return tiled(lambda zz: fn(zz[:, :C], zz[:, C:]), torch.cat([z, z_lr], 1), tile, overlap)


def sample_files(sr_fn, inp, output):
    """--sample: run `sr_fn(x_lr (1,3,h,w)) -> (1,3,4h,4w)` over an image or a folder; write PNGs."""
    if not inp or not os.path.exists(inp):
        raise SystemExit(f"--sample needs --input: an LR image or a folder of them (got {inp!r})")
    files = list_images(inp) if os.path.isdir(inp) else [inp]
    from tqdm import tqdm
    for f in tqdm(files, desc="sr", disable=len(files) < 2):
        x = load_image(f)[None]
        with torch.no_grad():
            y = sr_fn(x)
        save_image(y, os.path.join(output, os.path.splitext(os.path.basename(f))[0] + ".png"))
    print(f"{len(files)} images -> {output}")
    return len(files)


# --------------------------------------------------------------------------- config and logging
def parse_config(cls, argv=None):
    """Flags are the dataclass field names: `--lr_g 1e-5`. Booleans take true/false."""
    import argparse
    p = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0])
    for f in dataclasses.fields(cls):
        typ = f.type if isinstance(f.type, type) else eval(f.type)
        if typ is bool:
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True, default=f.default)
        else:
            p.add_argument(f"--{f.name}", type=typ, default=f.default)
    return cls(**vars(p.parse_args(argv)))


class Logger:
    """Rank-0 lines to the console and out_dir/log.txt."""

    def __init__(self, out_dir, master):
        self.master, self.file = master, os.path.join(out_dir, "log.txt")
        if master:
            os.makedirs(out_dir, exist_ok=True)
        self.start()

    def start(self):
        """Start the step timer (call it just before the training loop)."""
        self.t0, self.steps = time.time(), 0

    def __call__(self, msg):
        if self.master:
            print(msg, flush=True)
            with open(self.file, "a") as f:
                f.write(msg + "\n")

    def step(self, step, max_steps, losses, device, every):
        """Call on every rank after each optimizer step. Every `every` steps and at the last, one line:
        the losses (floats or tensors) averaged over ranks, ms per step since the last line, memory."""
        self.steps += 1
        if step % every and step != max_steps:
            return
        losses = reduce_mean({k: float(v) for k, v in losses.items()})
        ms, self.t0, self.steps = 1000 * (time.time() - self.t0) / self.steps, time.time(), 0
        main, rest = next(iter(losses.items())), list(losses.items())[1:]
        terms = " ".join(f"{k} {v:.4g}" for k, v in rest)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else peak_rss_gb()
        self(f"step {step}/{max_steps} | {main[0]} {main[1]:.4g} ({terms}) | {ms:.0f} ms/step | mem {mem:.2f} GB")


def peak_rss_gb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def save_grid(path, x_lr, out, x_hr):
    """One row per image: LR (bicubic-upsampled) | output | HR."""
    import torchvision
    n = min(4, out.shape[0])
    up = F.interpolate(x_lr[:n].float(), size=out.shape[-2:], mode="bicubic", align_corners=False)
    rows = torch.cat([up, out[:n].float(), x_hr[:n].float()], dim=-1).clamp(0, 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.utils.save_image(rows, path, nrow=1, padding=2)


# --------------------------------------------------------------------------- LPIPS
def load_lpips(device, pretrained=True):
    """VGG LPIPS on images in [0, 1]. Without the VGG weights (offline, tiny presets) the
    backbone is random (pnet_rand): fine for testing the code path, not for real training."""
    import lpips
    net = None
    if pretrained:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = lpips.LPIPS(net="vgg", verbose=False)
        except Exception as e:
            print(f"notice: LPIPS VGG weights unavailable ({type(e).__name__}); using a random backbone")
    if net is None:
        if not pretrained:
            print("notice: LPIPS with a random VGG backbone (tiny preset)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    net = net.to(device).eval().requires_grad_(False)
    return lambda x, y: net(x * 2 - 1, y * 2 - 1, normalize=False).mean()
