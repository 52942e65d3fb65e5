"""tests/plan.py, the CPU trace behind `bench.py --plan`: its byte counts against a hand count on real tensors, the fake
trace of a tiny method step against the same step on real tensors, and the plan's row of one tiny method."""
import json

import pytest
import torch
from torch import nn

import plan


def test_tracker_counts_weights_gradients_and_adamw_moments_by_hand():
    """Real tensors: after backward the live bytes are the weights and one gradient each (the graph freed); after
    AdamW's first step, also its two moments and a float32 step count per parameter tensor."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    opt = torch.optim.AdamW(net.parameters(), foreach=False)
    x = torch.randn(4, 32)
    n, k = sum(p.numel() for p in net.parameters()), len(list(net.parameters()))
    tracker = plan.Tracker(None)
    for p in net.parameters():
        tracker.add(p, static=True)
    with tracker:
        net(x).square().mean().backward()
        after_backward = tracker.total
        opt.step()
    assert after_backward == 4 * n + 4 * n  # fp32 weights + gradients
    assert tracker.total == 4 * n * 4 + 4 * k  # + exp_avg, exp_avg_sq, step
    hidden = 4 * 64 * 4  # (B, 64) fp32: the first layer's output and the ReLU's, both saved for backward
    assert tracker.peak >= 4 * n + 2 * hidden


def test_plan_of_a_tiny_method_and_its_fake_trace_equals_the_real_one(tmp_path):
    """`bench.py --plan` on tiny SMFSR's teacher stage (fake tensors, its own process): a row in the JSON, its parts
    summing to the peak, the frozen weights their elements at their dtype sizes; and the same step on real tensors
    (bf16 frozen weights under autocast, the loss, backward, AdamW) gives the same bytes at the peak and FLOPs."""
    rows = plan.main(["smfsr:teacher"], crop=64, batch=1, out=str(tmp_path / "plan.json"), tiny=True, jobs=1)
    assert json.loads((tmp_path / "plan.json").read_text()) == rows and len(rows) == 1
    r, GB = rows[0], plan.GB
    parts = sum(r[k + "_gb"] for k in ("frozen", "trainable", "grads", "optimizer", "activations"))
    assert parts == pytest.approx(r["peak_gb"]) and r["predicted_gb"] == pytest.approx(r["peak_gb"] * plan.MARGIN)
    sizes = {"bfloat16": 2, "float32": 4}
    assert r["frozen_gb"] * GB == pytest.approx(sum(n * sizes[d] for d, n in r["weights"].items()), abs=0.5)
    assert r["tflop"] > 0 and r["s_h100"] < r["s_paper"]
    real = plan.trace("smfsr", "teacher", 1, 64, tiny=True, real=True)
    assert real["flops"] == pytest.approx(r["tflop"] * 1e12, rel=1e-12)
    for role in ("frozen", "trainable", "optimizer", "activations"):
        assert real["roles"][role] == pytest.approx(r[role + "_gb"] * GB, abs=0.5)
    assert real["peak"] == pytest.approx(r["peak_gb"] * GB, abs=0.5)


def test_the_sr_trace_of_a_tiny_sampler_equals_the_real_one():
    """The one-step SR by SMFSR's own sampler, traced on fake tensors and run on real ones: its output at 4x the LR,
    the same FLOPs and bytes at the peak, the peak above the frozen weights."""
    fake = plan.trace_sr("smfsr", 128, tiny=True)
    real = plan.trace_sr("smfsr", 128, tiny=True, real=True)
    assert fake["shape"] == real["shape"] == [1, 3, 128, 128]
    assert fake["flops"] == real["flops"] > 0 and fake["weights"] == real["weights"]
    assert fake["peak"] == real["peak"] > fake["weights"]
