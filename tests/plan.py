"""What GPU a paper run needs, traced on the CPU (`python tests/bench.py --plan`).

Each method's training step at real size, its paper configuration (the published networks of tests/real_sizes.py,
the paper's crop, per-GPU batch and LoRA rank, bf16 frozen weights, gradient checkpointing as its Config sets it), run
through the method's own train(): every loss term, backward and the optimizer step. Nothing is allocated: networks are
built on the meta device (the LoRA added there), then every parameter and buffer becomes a fake tensor of its shape
(torch._subclasses.fake_tensor: shape, dtype, device, no memory), and one step runs on those. A TorchDispatchMode sees
every op: it counts each new storage's bytes until the storage dies, and at the peak splits the live bytes by role.

What the trace counts: every tensor the step allocates (weights, gradients, AdamW's two moments, activations,
temporaries of each op as PyTorch's CPU kernels allocate them, checkpointing's recompute), at bf16 autocast. What it
cannot: the CUDA context (~0.5 GB), cuBLAS/cuDNN workspaces, the caching allocator's fragmentation and rounding, and
kernels whose CUDA temporaries differ from the CPU ones (SDPA's flash kernel on GPU keeps less than the CPU's). So a
prediction adds MARGIN; a GPU run of `tests/bench.py --gpu` prints the measured peak beside it. Activations are CPU
autocast's (its fp32 op list differs slightly from CUDA's). The step is the first: the optimizer state appears in its
optimizer step, so the steady-state peak of later steps is max(peak before the update + the optimizer state, peak
during the update), which is what the table reports. With accumulation (--micro_batch < per-GPU batch) gradients live
through the next micro-batch's forward: the trace adds them to the pre-update peak.

FLOPs: torch.utils.flop_counter's formulas over the step's ops (matmuls, convolutions, attention: what dominates a DiT).
The DiT passes the method needs: each pass counted at the DiT's output layer, 2 N T FLOPs (N its weights, T the tokens
the velocity is read from), 6 N T where it back-propagates; overhead = step FLOPs / those (it includes checkpointing's
recompute, the VAE, VLM and discriminators, and text tokens; TEASR's condition tokens double its passes' length).
Predicted s/step = FLOPs / (peak dense bf16 TFLOP/s x UTIL).

Computed, not traced: the peak under --fsdp (the frozen DiT's share per rank). The one-step SR of a 1024 px output
runs each method's own sampler on the networks as built (the checkpoint it would read changes values, not shapes).
"""
import contextlib, dataclasses, gc, json, os, platform, subprocess, sys, tempfile, time, warnings, weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
import common  # noqa: E402

GB = 2**30
MARGIN = 1.10  # ours: +10% for fragmentation, workspaces and CUDA context (PyTorch's allocator typically keeps 5-10%)
UTIL = 0.40  # ours: the model FLOP utilisation assumed (large bf16 transformers train at 35-50%)
GPUS = {  # peak dense bf16 tensor TFLOP/s, memory GB
    "A800 80GB": (312, 80),  # NVIDIA A100 datasheet (A800: the A100 with slower NVLink), 312 dense bf16
    "A100 80GB": (312, 80),  # NVIDIA A100 datasheet
    "H100 SXM 80GB": (989, 80),  # NVIDIA H100 datasheet: 1,979 with sparsity, 989 dense
    "RTX 5880 Ada 48GB": (346, 48),  # NVIDIA datasheet: 1,385.9 FP8 sparse TFLOP/s; / 4 for dense bf16 (not verified)
}
# method, stage: (paper GPU, per-GPU batch, crop, base preset); the papers' Sec. 4 / implementation details
RUNS = {
    ("strsr", "1"): ("A800 80GB", 1, 1024, "flux2"), ("strsr", "2"): ("A800 80GB", 1, 1024, "flux2"),
    ("strsr-z", "1"): ("A800 80GB", 1, 1024, "zimage"), ("strsr-z", "2"): ("A800 80GB", 1, 1024, "zimage"),
    ("fluxsr", ""): ("A800 80GB", 1, 1024, "flux1"),  # FluxSR: 8 x A800, batch 16; its 1024 px pairs
    ("smfsr", "teacher"): ("RTX 5880 Ada 48GB", 8, 512, "sd3"), ("smfsr", "isc"): ("RTX 5880 Ada 48GB", 4, 512, "sd3"),
    ("smfsr", "gan"): ("RTX 5880 Ada 48GB", 2, 512, "sd3"),
    ("teasr", ""): ("A100 80GB", 1, 512, "qwen"),
}


# ----------------------------------------------------------------------------- the tracker
def _key(t):
    return t.untyped_storage()._cdata


INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)


def is_real_mask(i):  # a boolean index known on the CPU (Qwen3-VL's image-token mask)
    return isinstance(i, torch.Tensor) and not isinstance(i, FakeTensor) and i.dtype == torch.bool


class Tracker(TorchDispatchMode):
    """Live storage bytes op by op, and the FLOPs of each op (torch.utils.flop_counter's formulas). Ops on fake tensors
    (and large factory calls) run under `fake`; small CPU constants stay real, so .tolist() of a schedule works. The
    weights are static; the rest is kept by allocation id at the peak, for the roles."""

    def __init__(self, fake, big=2**16):
        super().__init__()
        from torch.utils.flop_counter import flop_registry, shape_wrapper
        self.formulas = {**flop_registry, **{k: shape_wrapper(f) for k, f in FLOP_MAP.items()}}
        self.fake, self.big, self.live, self.static, self.refs, self.next_id = fake, big, {}, {}, {}, 0
        self.total = self.peak = self.snap_total = self.flops = 0
        self.snap, self.phase, self.peaks = {}, "step", {}

    def add(self, t, static=False):
        """Count t's storage from now until it dies (static: for the whole trace); returns its allocation id."""
        st = t.untyped_storage()
        key = st._cdata
        if key not in self.live and key not in self.static:
            self.next_id += 1
            (self.static if static else self.live)[key] = (self.next_id, st.nbytes())
            self.total += st.nbytes()
            if not static:
                self.refs[key] = weakref.ref(st, lambda r, key=key: self._free(key))
        return self.alloc_id(t)

    def _free(self, key):
        self.refs.pop(key, None)
        if key in self.live:
            self.total -= self.live.pop(key)[1]

    def alloc_id(self, t):
        key = _key(t)
        return (self.live.get(key) or self.static.get(key) or (None,))[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in INDEXING and any(is_real_mask(i) for i in args[1]):  # a real mask on a fake tensor: its indices
            args = (args[0], [j for i in args[1] for j in (i.nonzero().unbind(1) if is_real_mask(i) else [i])],
                    *args[2:])
        fake = any(isinstance(a, FakeTensor) or isinstance(a, (list, tuple)) and a and isinstance(a[0], FakeTensor)
                   for a in args)
        if self.fake and not fake and args and isinstance(args[0], (list, tuple)) and \
                all(isinstance(s, int) for s in args[0]) and torch.Size(args[0]).numel() >= self.big:
            with self.fake:  # a large factory call (torch.randn(shape)): fake as well
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if func._overloadpacket in self.formulas:
            self.flops += self.formulas[func._overloadpacket](*args, **kwargs, out_val=out)
        for t in () if func.is_view else out if isinstance(out, (list, tuple)) else (out,):  # views allocate nothing
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.add(t)
        if self.total > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = self.total
        if self.total > self.peak:
            self.peak = self.total
            if self.total > self.snap_total + 2**24:  # a snapshot per 16 MB of new peak: exact to that
                self.snap, self.snap_total = dict(self.live.values()), self.total
        return out


def dit_bytes(dit):  # its own weights (no LoRA), and SD3's stored position table (tests/real_sizes.count)
    return sum(p.numel() * p.element_size() for n, p in dit.named_parameters() if "lora_" not in n) + \
        sum(b.numel() * b.element_size() for n, b in dit.named_buffers() if n.endswith("pos_embed.pos_embed"))


def all_modules():
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op warns
        warnings.simplefilter("ignore")
        return [m for m in gc.get_objects() if isinstance(m, torch.nn.Module)]


def is_fake(t):
    return isinstance(t, FakeTensor)


def fake_like(fake, t):
    with fake:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")


def materialise(fake, optimizers, modules):
    """Every module's meta (or real) parameters and buffers replaced by fake tensors of their shapes; the optimizers'
    references too. Returns the modules."""
    new = {}
    for m in modules:
        for store in (m._parameters, m._buffers):
            for name, p in list(store.items()):
                if p is None or is_fake(p):
                    continue
                if id(p) not in new:
                    f = fake_like(fake, p)
                    new[id(p)] = torch.nn.Parameter(f, p.requires_grad) if isinstance(p, torch.nn.Parameter) else f
                store[name] = new[id(p)]
        for name, t in list(vars(m).items()):  # plain tensor attributes (Qwen-Image's RoPE tables)
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                setattr(m, name, fake_like(fake, t))
    for opt in optimizers:
        for g in opt.param_groups:
            g["params"] = [new.get(id(p), p) for p in g["params"]]
    gc.collect()
    return modules


# ----------------------------------------------------------------------------- the step under the tracker
class MetaStays(TorchDispatchMode):
    """While the models are built: a meta tensor moved to a device stays meta (Module.to of a meta-built network)."""

    on = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if MetaStays.on and func is torch.ops.aten._to_copy.default and args[0].device.type == "meta":
            kwargs = {**kwargs, "device": torch.device("meta")}
        return func(*args, **kwargs)


def sdpa_cpu_flops(q, k, v, *a, **kw):  # the CPU flash kernel (shapes), counted as the GPU ones are
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(q, k, v)


def sdpa_cpu_backward_flops(grad_out, q, k, v, *a, **kw):
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out, q, k, v)


FLOP_MAP = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flops,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_cpu_backward_flops}


def all_optimizers():
    return [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)]


class StepTrace:
    """One step of a method's own training loop, traced. Its first micro-batch seed (common.micro_batch_seed) makes
    this run's models fake and starts the tracker; its update (common.optimizer_step) is traced too, then the
    measurements go to `out`."""

    def __init__(self, out, fake, micro, old, old_opts):
        self.out, self.fake, self.micro, self.old, self.old_opts = out, fake, micro, old, old_opts
        self.seed, self.update, self.tracker = common.micro_batch_seed, common.optimizer_step, None

    def micro_batch_seed(self, *args):
        if self.tracker is None:
            self.start()
        return self.seed(*args)

    def start(self):
        MetaStays.on = False
        self.modules = [m for m in all_modules() if m not in self.old]  # this run's: a test process holds others
        opts = [o for o in all_optimizers() if o not in self.old_opts]
        if self.fake:
            materialise(self.fake, opts, self.modules)
        self.tracker = tracker = Tracker(self.fake)
        self.params = {id(p): p for m in self.modules for p in m.parameters()}.values()
        self.trained = {id(p) for o in opts for g in o.param_groups for p in g["params"]}  # what an optimizer steps
        self.buffers = {id(b): b for m in self.modules for b in m.buffers()}.values()
        self.dit = dit = {"flops": 0.0, "calls": 0}
        for t in [*self.params, *self.buffers]:
            tracker.add(t, static=True)
        self.dits = [m for m in self.modules if type(m).__name__ in {v[0] for v in common.FAMILIES.values()}]
        for m in self.dits:
            n = sum(p.numel() for k, p in m.named_parameters() if "lora_" not in k)
            outs = [m.proj_out] if hasattr(m, "proj_out") else [f.linear for f in m.all_final_layer.values()]
            for layer in outs:  # once per pass of the DiT, also where a method runs its blocks itself
                layer.register_forward_hook(lambda mod, a, o, n=n: dit.update(
                    flops=dit["flops"] + (6 if torch.is_grad_enabled() else 2) * n * a[0].shape[:-1].numel(),
                    calls=dit["calls"] + 1))
        tracker.__enter__()  # left in optimizer_step: the micro-batches and the update run under it

    def optimizer_step(self, optimizers, clip):
        tracker, params, trained, micro = self.tracker, self.params, self.trained, self.micro
        opts = list(optimizers)
        tracker.phase, before = "update", tracker.peaks["step"]
        grads = {tracker.alloc_id(p.grad) for p in params if id(p) in trained and p.grad is not None}
        grad_bytes = sum(n for i, n in tracker.snap.items() if i in grads)
        norms = self.update(opts, clip)
        tracker.__exit__(None, None, None)
        state = {tracker.alloc_id(t) for o in opts for s in o.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor) and t.dim()}
        state_bytes = sum(n for i, n in tracker.live.values() if i in state)
        static = dict(tracker.static.values())
        frozen = {tracker.alloc_id(p) for p in params if id(p) not in trained}
        frozen |= {tracker.alloc_id(b) for b in self.buffers}
        train = {tracker.alloc_id(p) for p in params if id(p) in trained}
        roles = dict(frozen=0, trainable=0, grads=0, optimizer=0)
        for i, n in [*static.items(), *tracker.snap.items()]:
            for role, ids in (("frozen", frozen), ("trainable", train), ("grads", grads), ("optimizer", state)):
                if i in ids:
                    roles[role] += n
                    break
        total_grads = sum(p.numel() * p.element_size() for p in params if id(p) in trained)
        if micro > 1 and grad_bytes < total_grads:  # later micro-batches run with the gradients of the first
            before += total_grads - grad_bytes
        steady = max(before + state_bytes, tracker.peaks.get("update", 0))
        if steady > tracker.peak:  # the later steps' peak: before the update, with the optimizer state
            roles["optimizer"] = state_bytes
            roles["grads"] = max(roles["grads"], grad_bytes if micro == 1 else total_grads)
        roles["activations"] = steady - sum(roles.values())
        children = {id(c) for m in self.modules for c in m.children()}
        nets = {}  # frozen bytes per network (a module no other one holds)
        for m in self.modules:
            n = sum(p.numel() * p.element_size() for p in m.parameters() if id(p) not in trained)
            if id(m) not in children and n:
                nets[type(m).__name__] = nets.get(type(m).__name__, 0) + n
        weights = {}  # frozen elements per dtype
        for t in [p for p in params if id(p) not in trained] + list(self.buffers):
            weights[str(t.dtype)[6:]] = weights.get(str(t.dtype)[6:], 0) + t.numel()
        self.out.update(peak=steady, roles=roles, flops=tracker.flops, dit_flops=self.dit["flops"],
                        dit_calls=self.dit["calls"], weights=weights, nets=nets,
                        train_params=sum(p.numel() for p in params if id(p) in trained),
                        dit_bytes=max(map(dit_bytes, self.dits)))
        return norms


def nothing(*args, **kwargs):  # a stand-in for what the traced step skips (checkpoints, grids, curves, the log)
    return None


@contextlib.contextmanager
def patched(obj, **attrs):
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def gpu_like(weight_dtype=torch.bfloat16):
    """common's device switches as on a GPU: bf16 frozen weights, bf16 autocast (CPU's), checkpointing as cfg says."""
    def checkpointing(cfg, device, *modules):
        for m in modules if cfg.grad_ckpt else ():
            m.enable_gradient_checkpointing()
    autocast = (lambda device: torch.autocast("cpu", torch.bfloat16)) if weight_dtype == torch.bfloat16 else \
        (lambda device: contextlib.nullcontext())
    return dict(weight_dtype=lambda device: weight_dtype, checkpointing=checkpointing, autocast=autocast)


def trace(method, stage, batch, crop, micro=1, tiny=False, flags=None, weight_dtype=torch.bfloat16, real=False):
    """One traced training step of `method` (its stage) at real size (or tiny): a dict of the measurements. real: on
    real CPU tensors instead of fake ones (tests: the same peak)."""
    import importlib
    name = method.split("-")[0]
    mod = importlib.import_module(name)
    family = RUNS[(method, stage)][3] if (method, stage) in RUNS else None
    fake, out, old = FakeTensorMode(allow_non_fake_inputs=True), {}, weakref.WeakSet(all_modules())
    old_opts = weakref.WeakSet(all_optimizers())
    per = batch // micro

    def loader(ds, cfg, rank, world, step):
        """The step's `micro` batches, made now: before the trace, as a data loader's are."""
        def batch():
            with contextlib.nullcontext() if real else fake:
                if name == "fluxsr":  # (eps, z_hr, x_hr): a teacher pair at the crop
                    h = cfg.crop // 8
                    return torch.randn(per, 16, h, h), torch.randn(per, 16, h, h), torch.rand(per, 3, cfg.crop,
                                                                                               cfg.crop)
                x = torch.rand(per, 3, cfg.crop, cfg.crop)
            return (x, torch.arange(per)) if name == "smfsr" else x  # SMFSR's items carry their index
        return iter([batch() for _ in range(micro)]), micro

    def lr_of(x, scale, opts, g=None):  # the degradation's shapes (it reads pixel values: not traceable)
        return F.avg_pool2d(x, scale), x

    kw = dict(model=f"real-{family}", max_steps=1, batch_size=batch, micro_batch=per, crop=crop, num_workers=0,
              log_every=10**9, save_every=10**9, grid_every=10**9, **(flags or {}))
    if tiny:
        small = dict(lora_rank=8, lora_alpha=8, fake_rank=4, disc_width=16, fdl_projections=8)
        kw.update({k: v for k, v in small.items() if k in mod.Config.__dataclass_fields__})
    if stage:
        kw["stage"] = stage
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        kw["out_dir"] = tmp
        real_sizes(stack, real, tiny)
        step = StepTrace(out, None if real else fake, micro, old, old_opts)
        stack.enter_context(patched(common, micro_batch_seed=step.micro_batch_seed, optimizer_step=step.optimizer_step,
                                    save_checkpoint=nothing, save_grid=nothing, plot_curves=nothing,
                                    **gpu_like(weight_dtype)))
        stack.enter_context(patched(common.Logger, step=nothing, image=nothing))
        stack.enter_context(patched(mod, make_loader=loader, degrade=lr_of))
        if name == "fluxsr":
            os.makedirs(kw.setdefault("data", os.path.join(tmp, "pairs")))
            stack.enter_context(patched(mod, damaged_pairs=lambda d: [], PairDataset=lambda *a: [None]))
        if name == "strsr":  # stage 2 continues a stage-1 run: the same weights, shapes and optimizer state
            stack.enter_context(patched(mod, resume_stage=lambda cfg, models, opts, log: (0, 0)))
        if name == "smfsr" and stage != "teacher":  # the previous stages' checkpoints: their shapes are this run's
            c = {"train_base": kw.get("train_base", "none"), "lora_rank": kw.get("lora_rank", 128)}
            stack.enter_context(patched(mod, stage_inputs=lambda cfg: dataclasses.replace(
                cfg, init_ckpt="(traced)", teacher_ckpt="(traced)"), load_net=lambda *a: {}))
            stack.enter_context(patched(common, load_config=lambda ckpt: c))
        MetaStays.on = not real
        with MetaStays():
            mod.train(mod.Config(**kw))
    return out


def real_sizes(stack, real, tiny):
    """The method scripts build the real-size random networks (bench.use_real_sizes), on the meta device unless real;
    every patch is undone when `stack` closes."""
    import smfsr, strsr
    from bench import use_real_sizes
    stack.enter_context(patched(common, _load=common._load, tiny_cond=common.tiny_cond, PRESETS=dict(common.PRESETS)))
    stack.enter_context(patched(strsr, tiny_vlm_config=strsr.tiny_vlm_config, RANDOM_TRUNK=strsr.RANDOM_TRUNK))
    stack.enter_context(patched(smfsr, RANDOM_DINO=smfsr.RANDOM_DINO))
    for cls in (strsr.VLMEncoder, strsr.Discriminator, smfsr.Discriminator):
        stack.enter_context(patched(cls, __init__=cls.__init__))
    stack.enter_context(patched(torch.utils.checkpoint, get_device_states=lambda *a: ([], [])))
    use_real_sizes(torch.device("cpu" if real else "meta"), tiny)


SR_PX = 1024  # the output side of the traced SR
SR_FAMILY = {"strsr": "flux2", "strsr-z": "zimage", "fluxsr": "flux1", "smfsr": "sd3", "teasr": "qwen"}


def trace_sr(method, size=1024, tiny=False, real=False):
    """One SR to a `size` px output (a size/4 px LR) by the method's own sampler at real size, in bf16: the checkpoint
    it reads stood in by the networks as built (a checkpoint changes their values, not their shapes) and the stored
    prompt by a stand-in of its shape. Returns the peak bytes, FLOPs and the frozen weights' bytes."""
    import importlib
    name = method.split("-")[0]
    mod = importlib.import_module(name)
    fake, old, dits = FakeTensorMode(allow_non_fake_inputs=True), weakref.WeakSet(all_modules()), []
    kw = dict(model=f"real-{SR_FAMILY[method]}")
    if tiny:
        small = dict(lora_rank=8, lora_alpha=8, tile=8, overlap=2)
        kw.update({k: v for k, v in small.items() if k in mod.Config.__dataclass_fields__})
    cfg = mod.Config(**kw)
    load_dit = common.load_dit

    def dit_seen(*args, **kwargs):
        dits.append(load_dit(*args, **kwargs))
        return dits[-1]
    prompt = lambda *args, **kwargs: {"cond": common.tiny_cond(dits[-1], SR_FAMILY[method])}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        real_sizes(stack, real, tiny)
        stack.enter_context(patched(common, load_dit=dit_seen, checkpoint_config=lambda ckpt, cls: (tmp, cfg),
                                    load_checkpoint=prompt, **gpu_like()))
        if name == "smfsr":
            stack.enter_context(patched(mod, load_net=prompt))
        MetaStays.on = not real
        with MetaStays():
            sr = mod.build_sampler(dataclasses.replace(cfg, ckpt=tmp), "cpu")
        MetaStays.on = False
        modules = [m for m in all_modules() if m not in old]
        if not real:
            materialise(fake, [], modules)
        tracker = Tracker(None if real else fake)
        for t in {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}.values():
            tracker.add(t, static=True)
        weights = tracker.total
        with contextlib.nullcontext() if real else fake:
            x_lr = torch.rand(1, 3, size // 4, size // 4)
        with tracker, torch.no_grad():
            y = sr(x_lr)
    return dict(peak=tracker.peak, flops=tracker.flops, weights=weights, shape=list(y.shape))


# ----------------------------------------------------------------------------- the table
FSDP = {"strsr": 4, "strsr-z": 4, "fluxsr": 8}  # --fsdp true over the paper's GPUs (SMFSR, TEASR: no such flag)


def fsdp_gb(method, res):
    """Predicted peak with --fsdp true over the paper's GPUs: each rank holds 1/N of the frozen DiT (computed from the
    traced split, not traced: FSDP2 gathers one block at a time, a block's weights more)."""
    if method not in FSDP:
        return None
    return (res["peak"] - res["dit_bytes"] * (1 - 1 / FSDP[method])) * MARGIN / GB


def needs(r, gb):  # what a row needs on a `gb` GB card
    if r["predicted_gb"] <= gb:
        return "as is"
    if r["fsdp_gb"] is not None and r["fsdp_gb"] <= gb:
        return f"--fsdp true ({FSDP[r['method']]} GPUs)"
    return "no flag fits"


def row(method, stage, gpu, batch, crop, micro, res, gpu_gb):
    flops, r = res["flops"], res["roles"]
    peak = res["peak"] * MARGIN / GB
    return dict(method=method, stage=stage, paper_gpu=gpu, gpu_gb=gpu_gb, batch=batch, micro_batch=batch // micro,
                crop=crop,
                **{k + "_gb": v / GB for k, v in r.items()}, peak_gb=res["peak"] / GB, predicted_gb=peak,
                fits=peak <= gpu_gb, tflop=flops / 1e12, overhead=flops / max(res["dit_flops"], 1),
                dit_calls=res["dit_calls"], s_paper=flops / (GPUS[gpu][0] * 1e12 * UTIL),
                s_h100=flops / (GPUS["H100 SXM 80GB"][0] * 1e12 * UTIL), weights=res["weights"],
                train_params=res["train_params"], nets={k: v / GB for k, v in res["nets"].items()},
                fsdp_gb=fsdp_gb(method, res))


def job(args):
    """One row in its own process (the patches and the modules die with it): `python tests/plan.py JSON`."""
    cmd = [sys.executable, os.path.abspath(__file__), json.dumps(args)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = [l for l in r.stdout.splitlines() if l.startswith("PLAN ")]
    if not line:
        return dict(error=(r.stderr.strip().splitlines() or ["no output"])[-1][:200], trace_s=time.time() - t0)
    return dict(json.loads(line[-1][5:]), trace_s=time.time() - t0)


def check_weights(method, stage, res):
    """The traced DiT weights are the published architecture's parameters (tests/real_sizes.py) in bf16."""
    from real_sizes import build, count
    base = {"flux1": "flux1-dev", "flux2": "flux2-klein", "zimage": "zimage", "sd3": "sd35-medium",
            "qwen": "qwen-image"}[RUNS[(method, stage)][3]]
    n = count(build(base, "meta"))
    return "" if res["dit_bytes"] == 2 * n else f"DiT weights {res['dit_bytes']} B, but {base} has {n} x 2 B"


def main(methods=None, gpu_gb=None, crop=None, batch=None, out="out/plan.json", tiny=False, jobs=2):
    from concurrent.futures import ThreadPoolExecutor
    t_start = time.time()
    print(f"predicted from a CPU trace with fake tensors | {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {jobs} rows at a time | torch {torch.__version__} | bf16 frozen weights and "
          f"autocast, gradient checkpointing | +{MARGIN - 1:.0%} margin | utilisation {UTIL:.0%} of peak dense bf16 "
          f"({', '.join(f'{k} {v[0]}' for k, v in GPUS.items())} TFLOP/s)\n")
    print("| method | stage | GPU (GB) | batch x crop | frozen | trainable | grads | optim | activ. | peak +margin | "
          "fits | TFLOP/step | overhead | s/step paper GPU | s/step H100 | 24 / 48 / 80 GB |\n" + "|---" * 16 + "|")
    todo = [(m, s, batch or b, crop or c, 1, tiny, {}) for (m, s), (gpu, b, c, _) in RUNS.items()
            if not methods or m in methods or m.split("-")[0] in methods or f"{m}:{s}" in methods]
    todo.sort(key=lambda a: a[0] != "teasr")  # the longest trace first: the two workers end together
    rows = []
    with ThreadPoolExecutor(jobs) as pool:
        for args, res in zip(todo, pool.map(job, todo)):
            method, stage, b, c, micro = args[:5]
            if "error" not in res and not tiny and (bad := check_weights(method, stage, res)):
                res["error"] = bad
            if "error" in res:
                print(f"| {method} | {stage or '-'} | failed: {res['error']} |", flush=True)
                continue
            gpu = RUNS[(method, stage)][0]
            r = row(method, stage, gpu, b, c, micro, res, gpu_gb or GPUS[gpu][1])
            rows.append(r)
            print(f"| {method} | {stage or '-'} | {gpu.split()[0]} ({r['gpu_gb']:g}) | {b} x {c} | "
                  f"{r['frozen_gb']:.1f} | {r['trainable_gb']:.2f} | {r['grads_gb']:.2f} | {r['optimizer_gb']:.2f} | "
                  f"{r['activations_gb']:.1f} | {r['predicted_gb']:.1f} | {'yes' if r['fits'] else 'no'} | "
                  f"{r['tflop']:.0f} | {r['overhead']:.2f} | {r['s_paper']:.2f} | {r['s_h100']:.2f} | "
                  f"{' / '.join(needs(r, gb) for gb in (24, 48, 80))} | ({res['trace_s']:.0f} s)", flush=True)
    srs = [m for m in SR_FAMILY if not methods or m in methods or m.split("-")[0] in methods]  # not for "m:stage"
    print(f"\n| method | SR to {SR_PX} px: frozen | peak +margin | TFLOP | s on H100 |\n" + "|---" * 5 + "|")
    with ThreadPoolExecutor(jobs) as pool:
        for method, res in zip(srs, pool.map(job, [("sr", m, tiny) for m in srs])):
            if "error" in res:
                print(f"| {method} | failed: {res['error']} |", flush=True)
                continue
            r = dict(method=method, stage="sr", frozen_gb=res["weights"] / GB, peak_gb=res["peak"] / GB,
                     predicted_gb=res["peak"] * MARGIN / GB, tflop=res["flops"] / 1e12,
                     s_h100=res["flops"] / (GPUS["H100 SXM 80GB"][0] * 1e12 * UTIL))
            rows.append(r)
            print(f"| {method} | {r['frozen_gb']:.1f} | {r['predicted_gb']:.1f} | {r['tflop']:.1f} | "
                  f"{r['s_h100']:.2f} | ({res['trace_s']:.0f} s)", flush=True)
    print(f"\n{time.time() - t_start:.0f} s; GB are 2^30 bytes; rows in {out}")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    res = trace_sr(args[1], SR_PX, args[2]) if args[0] == "sr" else trace(*args)
    print("PLAN " + json.dumps(res), flush=True)
