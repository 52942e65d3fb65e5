"""What is the same for the four methods, tested once and parametrized over them: the command line (a flag always wins
over a preset, --help), exact resume, two ranks under torchrun equal to one process, and train -> sample (the CLI) ->
eval.py. FluxSR runs on four tiny teacher pairs; SMFSR's checks use its gan stage (the most state) on a tiny teacher
-> isc chain."""
import dataclasses, glob, importlib, json, math, os, shutil, sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common as C
import eval as E

from helpers import ROOT, run

METHODS = ["strsr", "fluxsr", "smfsr", "teasr"]
_prepared = {}


def flags(method, tmp_path_factory):
    """The keyword flags of a tiny run of `method`, its inputs made once per session."""
    if method not in _prepared:
        d, mod = tmp_path_factory.mktemp(method), importlib.import_module(method)
        kw = dict(model="tiny", num_workers=0, log_every=1, save_every=1, max_steps=2)
        if method == "fluxsr":
            mod.make_pairs(C.configure(mod.Config, model="tiny", data=str(d / "pairs"), make_pairs=4))
            kw.update(data=str(d / "pairs"), batch_size=1)
        if method == "smfsr":
            for stage, init in (("teacher", ""), ("isc", str(d / "teacher"))):
                mod.train(C.configure(mod.Config, **kw, stage=stage, init_ckpt=init, out_dir=str(d / stage)))
            kw.update(stage="gan", init_ckpt=str(d / "isc"))
        _prepared[method] = kw
    return dict(_prepared[method])


def watched(tmp_path_factory):
    """The flags of a run that is watched: an EMA, and a validation at step 2 on a 64 px crop of the held-out photo."""
    if not (hr := tmp_path_factory.getbasetemp() / "val-hr.png").exists():
        C.save_image(C.sample_photos(["astronaut"])[0][:, 100:164, 200:264], str(hr))
    return dict(ema_decay=0.9, val_every=2, val=str(hr))


def train(method, out, tmp_path_factory, **kw):
    mod = importlib.import_module(method)
    mod.train(C.configure(mod.Config, **{**flags(method, tmp_path_factory), **kw}, out_dir=str(out)))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2-step run of each method (checkpoints at steps 1 and 2), watched, made on first use."""
    runs = {}

    def get(method):
        if method not in runs:
            runs[method] = train(method, tmp_path_factory.mktemp(f"{method}-run"), tmp_path_factory,
                                 **watched(tmp_path_factory))
        return runs[method]
    return get


def script(method, *argv):
    """`python METHOD.py ARGV` run here: the script's own __main__ block (runpy) on these sys.argv, without the fresh
    process's ~4 s of imports (the fresh processes: test_a_real_preset_without_its_weights_stops_at_once, torchrun)."""
    import runpy
    old = sys.argv
    sys.argv = [f"{method}.py", *map(str, argv)]
    try:
        runpy.run_path(os.path.join(ROOT, f"{method}.py"), run_name="__main__")
    finally:
        sys.argv = old


def steps_logged(out):
    return [line.split(" | ")[:2] for line in open(os.path.join(out, "log.txt")) if line.startswith("step ")]


# ----------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("method", METHODS)
def test_a_given_flag_wins_over_the_preset_even_at_its_default(method):
    """--model mini applies MINI only to flags not given: a flag typed with the dataclass default's value survives."""
    mod = importlib.import_module(method)
    k = next(k for k, v in mod.MINI.items() if not isinstance(v, dict) and v != getattr(mod.Config, k))
    default = getattr(mod.Config, k)
    argv = ["--model", "mini", f"--{k}", str(default)]
    cfg = C.parse_config(mod.Config, argv)
    assert getattr(cfg, k) == default
    assert getattr(C.parse_config(mod.Config, ["--model", "mini"]), k) == mod.MINI[k]  # not given: the preset's
    assert getattr(C.parse_config(mod.Config, [f"--{k}", str(default)]), k) == default
    other = next(k2 for k2, v in mod.MINI.items() if k2 != k and not isinstance(v, dict))
    assert getattr(cfg, other) == mod.MINI[other]  # the rest of the preset still applies


@pytest.mark.parametrize("method", METHODS)
def test_help_lists_every_flag_with_its_default_and_source(method, capsys):
    with pytest.raises(SystemExit) as e:
        script(method, "--help")
    assert e.value.code == 0
    mod = importlib.import_module(method)
    text = " ".join(capsys.readouterr().out.split())
    comments = C._comments(mod.Config)
    for f in mod.Config.__dataclass_fields__.values():
        assert f"--{f.name}" in text and f.name in comments, f.name
        assert f"(default: {f.default})" in text, f.name
    assert "paper" in text and "ours" in text


def test_the_watching_flags_are_one_flag_in_every_method():
    """--ema_decay, --ema, --val_every and --val: the same default and the same comment in the four Configs."""
    mods = [importlib.import_module(m) for m in METHODS]
    for k in ("ema_decay", "ema", "val_every", "val"):
        assert len({(getattr(m.Config, k), C._comments(m.Config)[k]) for m in mods}) == 1, k


EXPECTED = {"strsr": ["flux2-klein", "Qwen3-VL", "CLIP ConvNeXt-XXLarge", "VGG16 of LPIPS"],
            "fluxsr": ["flux1-dev (transformer, vae, text_encoder, text_encoder_2)", "VGG16 of LPIPS"],
            "smfsr": ["sd35-medium (transformer, vae, text_encoder, text_encoder_2, text_encoder_3)"],
            "teasr": ["qwen-image (transformer, vae, text_encoder)", "VGG16 of LPIPS"]}


def stand_in(w, root):
    """A stand-in on disk for Weights w: a weights file, or a folder with its files and, beside each config.json, a
    weights file."""
    if not w.files:
        (root / f"{w.flag}.pth").write_bytes(b"x")
        return str(root / f"{w.flag}.pth")
    for f in w.files:
        (root / w.flag / f).parent.mkdir(parents=True, exist_ok=True)
        (root / w.flag / f).write_text("{}")
        if os.path.basename(f) == "config.json":
            (root / w.flag / f).with_name("model.safetensors").write_bytes(b"x")
    return str(root / w.flag)


@pytest.mark.parametrize("argv", METHODS + ["fluxsr --make_pairs 1"])
def test_a_real_preset_without_its_weights_stops_at_once(argv, tmp_path):
    """`python M.py` (the paper's base; FluxSR's pair making too) offline with empty caches: a non-zero exit within a
    minute, before anything is built or written, listing every missing network with where it was looked for and the
    prefetch command; no traceback. Then the check's other ways: a missing local path is named, `random` is refused on
    a real preset and accepted on tiny, and local copies pass."""
    import subprocess, time
    from helpers import ENV
    method, *rest = argv.split()
    env = {**ENV, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    rest += ["--data", str(tmp_path / "out")] if rest else []  # the pairs' folder
    r = subprocess.run([sys.executable, f"{method}.py", "--out_dir", str(tmp_path / "out"), *rest], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and time.time() - t0 < 60
    assert "Traceback" not in r.stderr and "missing pretrained weights" in r.stderr, r.stderr[-2000:]
    assert all(name in r.stderr for name in EXPECTED[method][:1 if rest else None]), r.stderr  # pairs: the teacher
    assert f"python common.py prefetch --method {method}" in r.stderr and "not in the Hugging Face cache" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing was started
    mod = importlib.import_module(method)
    cfg = mod.resolve(C.configure(mod.Config))
    gone = str(tmp_path / "gone" / "vgg16.pth")
    lpips = any(w.flag == "lpips_weights" for w in mod.pretrained(cfg))
    refused = {"lpips_weights": "random"} if lpips else {"model_path": gone}
    with pytest.raises(SystemExit) as e:
        C.check_weights(bad := dataclasses.replace(cfg, **refused), mod.pretrained(bad))
    why = "random (a random network) stands in only" if lpips else f"{gone} does not exist"
    assert why in str(e.value)
    tiny = mod.resolve(C.configure(mod.Config, model="tiny", **{k: "random" for k in refused if k != "model_path"}))
    C.check_weights(tiny, mod.pretrained(tiny))  # tiny presets: random stand-ins
    local = {w.flag: stand_in(w, tmp_path) for w in mod.pretrained(cfg)}  # with local copies given, the check passes
    cfg = dataclasses.replace(cfg, **local)
    C.check_weights(cfg, mod.pretrained(cfg))


@pytest.mark.parametrize("method", METHODS)
def test_sampling_checks_the_weights_first(method, tmp_path, monkeypatch):
    """--sample (and eval.py, the same sampler) from a real-preset checkpoint whose networks are not on disk: the
    missing list before anything is built (StrSR: its VLM folder too), no traceback."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    mod = importlib.import_module(method)
    cfg = C.configure(mod.Config, **({"stage": "teacher"} if method == "smfsr" else {}))
    if method == "strsr":
        cfg = dataclasses.replace(cfg, vlm=str(tmp_path / "qwen3-vl"))
    (tmp_path / "ckpt-0000001").mkdir()
    (tmp_path / "ckpt-0000001" / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    with pytest.raises(SystemExit) as e:
        mod.build_sampler(C.configure(mod.Config, ckpt=str(tmp_path)), "cpu")
    text = str(e.value)
    assert text.startswith("missing pretrained weights") and "not in the Hugging Face cache" in text, text
    assert f"  - {cfg.model} (transformer, vae): {C.PRESETS[cfg.model].hub} is not" in text  # no text encoders
    assert (f"{tmp_path / 'qwen3-vl'} does not exist" in text) == (method == "strsr")


# ----------------------------------------------------------------------------- real presets offline, from the cache
@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache in the hub's layout holding, under the real hub ids, tiny copies of the four methods'
    default bases with every transformer (and VAE) in shards, as the real FLUX.1-dev and Qwen-Image are: FLUX.2's
    with a tiny Qwen3 text encoder and its tokenizer (prompt_cond runs on it; the transformer reads its 3 x 8 wide
    embeddings), the others' text encoders stand-in files (their prompts: tiny_cond); StrSR's VLM and SMFSR's DINOv3,
    tiny and sharded; and StrSR's CLIP file (a stand-in)."""
    import diffusers, tokenizers
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM
    from helpers import hub_repo
    cache, work, embeds = tmp_path_factory.mktemp("hf-hub"), tmp_path_factory.mktemp("pipes"), None
    for method in METHODS:
        preset = importlib.import_module(method).Config.model
        tiny = C.resolve_preset("tiny", preset)
        fam, n = C.PRESETS[tiny].family, {"flux1": 2, "sd3": 3}.get(C.PRESETS[tiny].family, 1)
        text = {f"{k}{s}": None for s in ("", "_2", "_3")[:n] for k in ("text_encoder", "tokenizer")}
        dit = C.load_dit(tiny)
        if fam == "flux2":
            vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<unk>", "user", "assistant"])}
            tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
            tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
            text["tokenizer"] = Qwen2TokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>")
            text["tokenizer"].chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # 27 layers: the pipeline reads hidden states 9, 18 and 27
                text["text_encoder"] = Qwen3ForCausalLM(Qwen3Config(vocab_size=4, hidden_size=8, intermediate_size=16,
                    num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1, head_dim=4))
                dit = diffusers.Flux2Transformer2DModel(**{**C.PRESETS[tiny].dit, "joint_attention_dim": 24})
        pipe = getattr(diffusers, C.FAMILIES[fam][2])(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                                     vae=C.load_vae(tiny), transformer=dit, **text)
        pipe.save_pretrained(work / fam, max_shard_size="40KB")
        if fam == "flux2":  # the pipeline's own encoding, read from these files
            with torch.no_grad():
                embeds = type(pipe).from_pretrained(work / fam, transformer=None, vae=None, torch_dtype=torch.bfloat16
                                                    ).encode_prompt("", device="cpu")[0].float()
        for part in (k for k, v in text.items() if k.startswith("text_encoder") and v is None):
            (work / fam / part).mkdir()
            (work / fam / part / "config.json").write_text("{}")
            (work / fam / part / "model.safetensors").write_bytes(b"stand-in")
        hub_repo(cache, C.PRESETS[preset].hub, {os.path.relpath(os.path.join(d, f), work / fam):
                                               open(os.path.join(d, f), "rb").read()
                                               for d, _, fs in os.walk(work / fam) for f in fs})
    strsr, smfsr = importlib.import_module("strsr"), importlib.import_module("smfsr")
    hub_repo(cache, strsr.CLIP_HUB, {"open_clip_pytorch_model.bin": b"stand-in"})
    vlm, dino = tiny_vlm(work / "vlm"), tiny_dino(work / "dino", smfsr.RANDOM_DINO)
    for folder, repo in ((work / "vlm", strsr.Config.vlm), (work / "dino", smfsr.Config.disc_model)):
        hub_repo(cache, repo, {f: (folder / f).read_bytes() for f in os.listdir(folder)})
    return cache, {"embeds": embeds, "vlm": vlm, "dino": dino}


def tiny_vlm(folder):
    """StrSR's tiny Qwen3-VL saved in shards with a processor (a word-level tokenizer, the image tokens, a chat
    template); returns its state dict."""
    import tokenizers
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessor, Qwen3VLModel, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    specials = ["<|endoftext|>", "<unk>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(specials + ["user"])},
                                                           unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = Qwen2TokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[2:]})
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|>"
                "<|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2),
                     tokenizer=tok, video_processor=Qwen3VLVideoProcessor(), chat_template=template).save_pretrained(
                         folder)
    cfg = importlib.import_module("strsr").tiny_vlm_config()
    cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id = 2, 4, 5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3VLModel(cfg)
    model.save_pretrained(folder, max_shard_size="100KB")
    return model.state_dict()


def tiny_dino(folder, config):
    """SMFSR's tiny DINOv3 saved in shards; returns its state dict."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DINOv3ViTModel(DINOv3ViTConfig(**config))
    model.save_pretrained(folder, max_shard_size="50KB")
    return model.state_dict()


@pytest.fixture(params=["HF_HUB_OFFLINE=1"])
def offline(request, hub_cache, monkeypatch):
    """The cache above and either HF_HUB_OFFLINE=1, as the README's GPU workflow (any request to the hub raises), or
    no network at all (every connection refused, the variable unset)."""
    import socket
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache[0]))
    if request.param == "HF_HUB_OFFLINE=1":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(OSError("no network")))
    return hub_cache


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE=1", "no network"], indirect=True)
def test_a_sharded_base_loads_offline_from_the_cache(offline, tmp_path):
    """load_dit and load_vae read every shard of the cached repo (their weights equal the files'), prompt_cond encodes
    with the cached text encoder as the pipeline loaded from the same files does, and StrSR's Qwen3-VL (with its
    processor) and SMFSR's DINOv3 load their cached shards: with HF_HUB_OFFLINE=1 and with no network."""
    from safetensors.torch import load_file
    from huggingface_hub import snapshot_download
    snap = snapshot_download(C.PRESETS["flux2-klein-base"].hub, local_files_only=True)
    for name, net in (("transformer", C.load_dit("flux2-klein-base")), ("vae", C.load_vae("flux2-klein-base"))):
        shards = glob.glob(os.path.join(snap, name, "*.safetensors"))
        files = {k: v for f in shards for k, v in load_file(f).items()}
        assert len(shards) > 1 and files.keys() == net.state_dict().keys()
        assert all(torch.equal(files[k], v) for k, v in net.state_dict().items()), name
    cond = C.prompt_cond("flux2-klein-base", "", str(tmp_path), "cpu")
    assert torch.equal(cond["embeds"], offline[1]["embeds"])
    strsr, smfsr = importlib.import_module("strsr"), importlib.import_module("smfsr")
    vlm = strsr.VLMEncoder(strsr.Config.vlm, "describe", 64 * 64)  # the VLM and its processor
    dino = smfsr.Discriminator(False, smfsr.Config.disc_model, 8).vit
    for net, ref in ((vlm.model, offline[1]["vlm"]), (dino, offline[1]["dino"])):
        sd = net.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(v, ref[k]) for k, v in sd.items())
    assert vlm.pre[-1] == 4 and vlm.post[0] == 5  # the cached chat template around the image


@pytest.mark.parametrize("method", METHODS)
def test_a_real_preset_trains_and_samples_offline_from_the_cache(method, offline, tmp_path, monkeypatch):
    """Each method's default base, as cached (sharded), offline: the weights check, one training step of its real-preset
    code path (StrSR with its text condition; FluxSR makes a teacher pair from it first) and the sampler from the
    checkpoint, which gives the same image twice. The other pretrained networks are off (LPIPS weights 0) or random
    (StrSR's CLIP), and the families without a cached text encoder take tiny_cond."""
    mod = importlib.import_module(method)
    preset, real_prompt = mod.Config.model, C.prompt_cond
    fake_prompt = lambda p, prompt, *a, **kw: real_prompt(p, prompt, *a, **kw) if C.PRESETS[p].family == "flux2" \
        else C.tiny_cond(C.load_dit(p), C.PRESETS[p].family)
    monkeypatch.setattr(C, "prompt_cond", fake_prompt)
    kw = {k: v for k, v in mod.TINY.items() if not isinstance(v, dict)}
    kw.update(model=preset, num_workers=0, log_every=1, save_every=1, max_steps=1, batch_size=1,
              out_dir=str(tmp_path / "run"))
    kw.update({"strsr": dict(cond="text", w_lpips=0.0), "teasr": dict(w_lpips=0.0),
               "fluxsr": dict(w_tv_lpips=0.0, data=str(tmp_path / "pairs"), teacher_steps=1),
               "smfsr": dict(stage="teacher", cache_dir=str(tmp_path / "cache"))}[method])
    if method == "strsr":  # CLIP-ConvNeXt-XXLarge: the tiny presets' random stand-in
        real_disc = mod.Discriminator
        monkeypatch.setattr(mod, "Discriminator", lambda random_net, *a: real_disc(True, *a))
    if method == "fluxsr":
        mod.make_pairs(C.configure(mod.Config, **kw, make_pairs=1))
    mod.train(C.configure(mod.Config, **kw))
    assert steps_logged(tmp_path / "run")[0][0] == "step 1/1"
    x_lr = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    sr = [mod.build_sampler(C.configure(mod.Config, ckpt=str(tmp_path / "run")), "cpu")(x_lr) for _ in range(2)]
    assert sr[0].shape == (1, 3, 48, 64) and 0 <= sr[0].min() and sr[0].max() <= 1 and torch.equal(sr[0], sr[1])


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", METHODS)
def test_exact_resume(method, trained, tmp_path, tmp_path_factory):
    """Resuming the run's step-1 checkpoint for one more step gives its step-2 checkpoint: every weight file, every
    optimizer state, the EMA bit for bit, and the logged losses of step 2."""
    out = trained(method)
    shutil.copytree(out / "ckpt-0000001", tmp_path / "ckpt-0000001")
    train(method, tmp_path, tmp_path_factory, **watched(tmp_path_factory))
    a, b = out / "ckpt-0000002", tmp_path / "ckpt-0000002"
    files = sorted(os.path.basename(f) for f in glob.glob(str(a / "*.safetensors")))
    assert files and files == sorted(os.path.basename(f) for f in glob.glob(str(b / "*.safetensors")))
    for f in files:
        sa, sb = load_file(str(a / f)), load_file(str(b / f))
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=0, msg=f"{f}:{k}")
    trained_anything = any(not torch.equal(v, load_file(str(out / "ckpt-0000001" / f))[k])
                           for f in files for k, v in load_file(str(a / f)).items())
    assert trained_anything  # step 2 changed the weights: the comparison is not vacuous
    ema, resumed_ema = load_file(str(a / "ema.safetensors")), load_file(str(b / "ema.safetensors"))
    assert ema.keys() == resumed_ema.keys() and all(torch.equal(ema[k], resumed_ema[k]) for k in ema)
    assert any(not torch.equal(v, load_file(str(out / "ckpt-0000001" / "ema.safetensors"))[k]) for k, v in ema.items())
    sa, sb = (torch.load(c / "state.pt", weights_only=True) for c in (a, b))
    for name, opt in sa["optimizers"].items():
        for i, st in opt["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(v, sb["optimizers"][name]["state"][i][k], atol=1e-9, rtol=1e-6)
    for k in sa.get("fake_lora", {}):  # SMFSR's fake score
        assert torch.equal(sa["fake_lora"][k], sb["fake_lora"][k])
    assert steps_logged(out)[1] == steps_logged(tmp_path)[-1]


def losses_logged(out):
    """{step: [the logged loss terms]} of a run's log.txt."""
    rows = {}
    for line in open(os.path.join(out, "log.txt")):
        if line.startswith("step "):
            head, terms = line.split(" | ")[:2]
            rows[head.split()[1]] = [float(v) for v in terms.replace("(", " ").replace(")", " ").split()[1::2]]
    return rows


def two_rank_flags(method, tmp_path_factory):
    """The flags of the two-rank comparison: the global batch 2 in micro-batches of 1; --fsdp true where the method
    shards (StrSR, FluxSR), in the torchrun command only."""
    kw = {**flags(method, tmp_path_factory), "batch_size": 2, "micro_batch": 1}
    fsdp = "fsdp" in importlib.import_module(method).Config.__dataclass_fields__
    return kw, [f"--{k}={v}" for k, v in {**kw, **({"fsdp": "true"} if fsdp else {})}.items()], fsdp


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One `torchrun --standalone --nproc_per_node=2` (a free port: the one scheme of every test; two CPU ranks, gloo)
    runs each method's script with the flags above, into <root>/<method>/two, and each method that shards again from
    its step-1 checkpoint, into <method>/resumed: the runs one after another in the same two ranks
    (tests/torchrun_runs.py), so torchrun and the imports are paid once. Returns (root, {(method, "two" or
    "resumed"): the log of that run}, the whole log)."""
    root, jobs, names = tmp_path_factory.mktemp("two-ranks"), [], []
    for method in METHODS:
        argv, fsdp = two_rank_flags(method, tmp_path_factory)[1:]
        for which in ("two", "resumed") if fsdp else ("two",):
            if which == "resumed":
                jobs.append(["copy", str(root / method / "two" / "ckpt-0000001"),
                             str(root / method / "resumed" / "ckpt-0000001")])
            jobs.append(["run", f"{method}.py", argv + [f"--out_dir={root / method / which}"]])
            names.append((method, which))
    (root / "jobs.json").write_text(json.dumps(jobs))
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "tests/torchrun_runs.py", str(root / "jobs.json")])
    runs = [i for i, job in enumerate(jobs) if job[0] == "run"]
    logs = {name: r.stdout.split(f"=== run {i}\n")[1].split("=== run ")[0] for name, i in zip(names, runs)}
    return root, logs, r.stdout


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_equal_one_process(method, two_ranks, tmp_path, tmp_path_factory):
    """torchrun with two CPU ranks (the fixture above) gives the losses and weights of one process that accumulates the
    same global batch in two micro-batches: the same data, the same random draws (seeded by the micro-batch's position
    in the run), the same averaged gradients. The methods that shard (--fsdp: StrSR, FluxSR) run sharded, and a
    sharded run resumes its step-1 checkpoint to the same step 2."""
    kw, _, fsdp = two_rank_flags(method, tmp_path_factory)
    train(method, tmp_path / "one", tmp_path_factory, **kw)
    root, logs, stdout = two_ranks
    two_dir = root / method / "two"
    assert logs[method, "two"].count("step 2/2") == 1 and stdout.count("step 2/2") == len(logs)  # rank 0 logs alone
    assert fsdp == ("FSDP2: 2 blocks and the root sharded over 2 ranks" in logs[method, "two"])
    one, two = losses_logged(tmp_path / "one"), losses_logged(two_dir)
    assert one.keys() == two.keys() == {"1/2", "2/2"}
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=2e-3, abs=1e-6), k
    # Spectral norm's power iteration advances once per call, twice as often in one process as in each rank; that
    # shifts gradients by ~1e-6, and where a gradient is near zero Adam's normalised steps (at most ~1.2 lr each) can
    # then part two runs by up to ~4.6 lr over two steps: the weights' tolerance, on top of the losses' 2e-3
    cfg = json.load(open(tmp_path / "one" / "ckpt-0000002" / "config.json"))
    atol = 1e-6 + 5 * max(v for k, v in cfg.items() if k in ("lr", "lr_d", "lr_fake"))
    for f in glob.glob(str(tmp_path / "one" / "ckpt-0000002" / "*.safetensors")):
        a, b = load_file(f), load_file(str(two_dir / "ckpt-0000002" / os.path.basename(f)))
        for k in (k for k in a if not k.endswith(("._u", "._v"))):  # the power iteration's own state
            torch.testing.assert_close(b[k], a[k], atol=atol, rtol=1e-4, msg=f"{os.path.basename(f)}:{k}")
    assert fsdp == ((method, "resumed") in logs)
    if fsdp:
        resumed = root / method / "resumed"
        assert "resumed " in logs[method, "resumed"] and losses_logged(resumed) == {"2/2": two["2/2"]}  # step 2 only
        for f in glob.glob(str(two_dir / "ckpt-0000002" / "*.safetensors")):
            a, b = load_file(f), load_file(str(resumed / "ckpt-0000002" / os.path.basename(f)))
            assert all(torch.equal(a[k], b[k]) for k in a), f


@pytest.mark.parametrize("method", METHODS)
def test_a_run_is_watched_in_tensorboard_curves_and_validation(method, trained):
    """out_dir/tb holds each logged loss term, each optimizer's lr (the config's) and gradient norm, s/step, peak
    memory, the grids and the validation scores; the validation's PSNR is the sampler's, on Y, computed here; the
    run ends with curves.png."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = trained(method)
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    head = open(out / "log.txt").read().split("\nstep 2/2 | ")[1].split(" | ")[0]
    names = head.replace("(", " ").replace(")", " ").split()[::2]
    state = torch.load(out / "ckpt-0000002" / "state.pt", weights_only=True)
    opts, cfg = list(state["optimizers"]), json.load(open(out / "ckpt-0000002" / "config.json"))
    want = {f"loss/{n}" for n in names} | {f"lr/{o}" for o in opts} | {f"grad_norm/{o}" for o in opts}
    want |= {"time/s_per_step", "memory/peak_GB"} | {f"val/{c}" for c in E.VAL_COLS} | {"val/bicubic_PSNR"}
    assert want <= set(acc.Tags()["scalars"]) and "grid" in acc.Tags()["images"]
    assert acc.Scalars(f"lr/{opts[0]}")[0].value == pytest.approx(cfg["lr"], rel=1e-6)
    assert all(e.value > 0 for o in opts for e in acc.Scalars(f"grad_norm/{o}"))
    logged = dict(zip(names, map(float, head.replace("(", " ").replace(")", " ").split()[1::2])))
    assert acc.Scalars(f"loss/{names[0]}")[-1].value == pytest.approx(logged[names[0]], rel=1e-3)
    psnr = float(open(out / "log.txt").read().split("val step 2 | PSNR ")[1].split()[0])
    mod = importlib.import_module(method)
    sr = mod.build_sampler(C.configure(mod.Config, model="tiny", ckpt=str(out / "ckpt-0000002")), "cpu")
    x_lr = C.load_image(str(out / "val" / f"LR_{cfg['degrade']}" / "val-hr.png"))[None]
    y = lambda x: (16 + (x.double() * 255).round() @ torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64)
                   / 255) / 255  # BT.601 Y of an 8-bit image, in [0, 1]
    x_sr, x_hr = sr(x_lr)[0].permute(1, 2, 0), C.load_image(cfg["val"]).permute(1, 2, 0)
    assert psnr == pytest.approx(10 * math.log10(1 / (y(x_sr) - y(x_hr)).pow(2).mean().item()), abs=0.01)
    assert Image.open(out / "curves.png").size[0] > 400


@pytest.mark.parametrize("method", METHODS)
def test_train_then_sample_then_eval(method, trained, tmp_path):
    """The CLI samples any input (odd sizes, gray, RGBA) from the checkpoint at 4x its size; eval.py scores the method
    on a paired benchmark through the same sampler."""
    out = trained(method)
    assert (out / "grids" / "step-0000002.png").exists()
    inp = tmp_path / "in"
    inp.mkdir()
    Image.new("L", (13, 11), 120).save(inp / "gray.png")
    Image.new("RGBA", (9, 17), (10, 200, 30, 128)).save(inp / "rgba.png")
    C.save_image(torch.rand(3, 21, 30, generator=torch.Generator().manual_seed(0)), str(inp / "x.png"))
    script(method, "--sample", "--ckpt", out, "--input", inp, "--output", tmp_path / "sr")
    assert [Image.open(tmp_path / "sr" / f).size for f in ("gray.png", "rgba.png", "x.png")] == [(52, 44), (36, 68),
                                                                                                  (120, 84)]
    data = tmp_path / "data" / "RealSR"
    x_hr = C.sample_photos(["astronaut"])[0][:, 100:164, 200:264]
    C.save_image(torch.nn.functional.interpolate(x_hr[None], scale_factor=0.25, mode="area"),
                 str(data / "LR" / "a_LR4.png"))
    C.save_image(x_hr, str(data / "HR" / "a_HR.png"))
    rows = E.main(["--method", method, "--ckpt", str(out), "--bench", "RealSR", "--data_root", str(tmp_path / "data"),
                   "--out_dir", str(tmp_path / "eval"), "--metrics", "PSNR,SSIM"])
    assert rows[0]["method"] == method and 5 < rows[0]["PSNR"] < 60 and rows[0]["s/img"] > 0
    assert json.load(open(tmp_path / "eval" / "results.json"))[0]["dataset"] == "RealSR"


def _sampler(method, ckpt, **flags):
    mod = importlib.import_module(method)
    return mod.build_sampler(C.configure(mod.Config, model="tiny", ckpt=str(ckpt), **flags), "cpu")


@pytest.mark.parametrize("method", METHODS)
def test_sampling_flags_scale_color_fix_dtype(method, trained):
    """--scale 3 --color_fix adain is the x4 output resized to 3x, then given the bicubic LR's channel statistics;
    --dtype bf16 really samples in bf16: near the fp32 output, not equal to it."""
    out, x_lr = trained(method), torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(3))
    x4 = _sampler(method, out)(x_lr)
    got = _sampler(method, out, scale=3, color_fix="adain")(x_lr)
    want = C.color_fix(C.resize(x4, (60, 72)), C.resize(x_lr, (60, 72)).clamp(0, 1), "adain").clamp(0, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    err = (_sampler(method, out, dtype="bf16")(x_lr) - x4).abs()
    assert 1e-4 < err.mean() < 0.05, err.mean()


@pytest.mark.parametrize("method", ["strsr", "fluxsr", "smfsr"])
def test_fuse_lora_equals_the_unmerged_lora(method, trained, tmp_path, tmp_path_factory):
    """--fuse_lora merges the LoRA into the base: the same output to float tolerance, on a LoRA made large enough to
    matter (random B; SMFSR's on its teacher). TEASR's condition LoRA cannot merge: the flag is refused."""
    ckpt = C.latest_checkpoint(str(trained(method)))
    if method == "smfsr":
        run_dir = train(method, tmp_path / "run", tmp_path_factory, stage="teacher", init_ckpt="", train_base="lora",
                        lora_rank=4, max_steps=1)
        ckpt = C.latest_checkpoint(str(run_dir))
    shutil.copytree(ckpt, tmp_path / "ckpt")
    from safetensors.torch import save_file
    g, x_lr = torch.Generator().manual_seed(0), torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(4))
    outs = {}
    for scale in (0.0, 2.0):  # LoRA off (B = 0), then a random LoRA
        for f in glob.glob(str(tmp_path / "ckpt" / "*lora*.safetensors")):
            sd = load_file(f)
            save_file({k: scale * torch.randn(v.shape, generator=g) if "lora_B" in k else v for k, v in sd.items()}, f)
        outs[scale] = [_sampler(method, tmp_path / "ckpt", fuse_lora=fuse, ema=False)(x_lr) for fuse in (False, True)]
    torch.testing.assert_close(outs[2.0][1], outs[2.0][0], atol=1e-4, rtol=0)
    assert (outs[2.0][0] - outs[0.0][0]).abs().max() > 1e-2  # the LoRA changes the image: merging is not a no-op
    mod = importlib.import_module("teasr")
    with pytest.raises(SystemExit, match="fuse_lora: teasr.py does not support it"):
        C.parse_config(mod.Config, ["--fuse_lora", "true"])


@pytest.mark.parametrize("method", METHODS)
def test_zero_init_starts_at_the_vae_round_trip_of_bicubic(method, tmp_path, tmp_path_factory):
    """--zero_init (the minis): before any update the one step returns z_lr, so the sampler's image is the VAE's round
    trip of bicubic x4 (SMFSR's noise start included: its jump from eps lands on z_lr). --ema_decay 1 keeps the init
    as the EMA, which --sample uses; --ema false samples the updated weights."""
    kw = dict(zero_init=True, train_base="full", lr=1e-2, max_steps=1, ema_decay=1.0)
    if method == "smfsr":
        kw.update(stage="teacher", init_ckpt="")
    out = train(method, tmp_path / "run", tmp_path_factory, **kw)
    mod = importlib.import_module(method)
    x_lr = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(1))
    sr = mod.build_sampler(C.configure(mod.Config, model="tiny", ckpt=str(out), steps=1), "cpu")(x_lr)
    preset = C.resolve_preset("tiny", mod.Config.model)
    vae, family = C.load_vae(preset, None, torch.float32, torch.device("cpu")), C.PRESETS[preset].family
    g = torch.Generator().manual_seed(0) if method == "strsr" else None  # StrSR draws z_lr (seed 0)
    torch.testing.assert_close(sr, C.super_resolve(vae, family, x_lr, lambda z: z, g), atol=1e-5, rtol=0)
    raw = mod.build_sampler(C.configure(mod.Config, model="tiny", ckpt=str(out), steps=1, ema=False), "cpu")(x_lr)
    assert (raw - sr).abs().max() > 1e-3
    base = C.configure(mod.Config, model="tiny", **({"stage": "teacher"} if method == "smfsr" else {}))
    with pytest.raises(SystemExit, match="--zero_init zeroes the base's output layer: it needs --train_base full"):
        mod.resolve(dataclasses.replace(base, zero_init=True))  # each method's default base is not trained whole
