"""A toy training run on the common.py harness (no DiT): exact resume and DDP equivalence
are properties of the harness, so they are tested here on a model small enough to run in
seconds. `python tests/toy_train.py --out_dir D --max_steps N` or under torchrun."""
import dataclasses, os, sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C


@dataclasses.dataclass
class Config:
    out_dir: str = "out/toy"
    max_steps: int = 4
    batch_size: int = 4
    micro_batch: int = 1
    crop: int = 32
    seed: int = 0
    save_every: int = 2
    num_workers: int = 0
    noise: bool = False  # use the global RNG in the step (exact resume must restore it)


def train(cfg):
    rank, world, device = C.compute_init(cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # same init on every rank
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    step, ckpt = 0, C.latest_checkpoint(cfg.out_dir)
    if ckpt:
        step = C.load_checkpoint(ckpt, {"net": net}, {"opt": opt}, generators={"g": gen})["step"]
    loader, accum = C.make_loader(C.ImageDataset("sample", cfg.crop), cfg, rank, world, step)
    log = C.Logger(cfg.out_dir, rank == 0)
    while step < cfg.max_steps:
        sums = {"loss": 0.0}
        for _ in range(accum):
            x = next(loader)
            noise = 0.1 * torch.randn(x.shape, generator=gen) + 0.01 * torch.randn_like(x) if cfg.noise else 0
            loss = ((net(x + noise) - x) ** 2).mean()
            (loss / accum).backward()
            sums["loss"] += loss.item() / accum
        C.optimizer_step([opt], clip=0.05)  # a clip that bites: after the reduction
        step += 1
        log.step(step, cfg.max_steps, sums, every=1)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            C.save_checkpoint(cfg.out_dir, step, cfg, {"net": net}, {"opt": opt}, generators={"g": gen})
    if rank == 0:
        torch.save(net.state_dict(), os.path.join(cfg.out_dir, "final.pt"))


if __name__ == "__main__":
    train(Config(**{k: type(getattr(Config, k))(v) if k != "noise" else v.lower() == "true" for k, v in
                     zip((a.lstrip("-") for a in sys.argv[1::2]), sys.argv[2::2])}))
