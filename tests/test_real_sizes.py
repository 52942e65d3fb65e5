"""GPU readiness on a CPU: the real networks' architectures (tests/real_sizes.py) built on the meta device, with no
weights and no hub, have the published sizes: within 1%, or within the rounding of a figure published to fewer
digits ("4B": 3.5B to 4.5B)."""
import pytest

from real_sizes import REAL, build, count


def published(figure):
    """("4B") -> (4e9, the half unit of its last digit: 0.5e9)."""
    number, unit = figure[:-1], {"M": 1e6, "B": 1e9}[figure[-1]]
    decimals = len(number.split(".")[1]) if "." in number else 0
    return float(number) * unit, 0.5 * 10 ** -decimals * unit


@pytest.mark.parametrize("name", list(REAL))
def test_real_architecture_has_the_published_size(name):
    n, (size, rounding) = count(build(name, "meta")), published(REAL[name][3])
    assert abs(n - size) <= max(0.01 * size, rounding), f"{name}: {n / 1e9:.4f}B; published {REAL[name][4]}"


def test_published_figures():
    assert published("4B") == (4e9, 0.5e9) and published("2.5B") == (2.5e9, pytest.approx(0.05e9))
    assert published("846.54M") == (pytest.approx(846.54e6), pytest.approx(0.005e6))


def test_bench_gpu_needs_a_gpu_and_runs_on_tiny_sizes(monkeypatch, capsys):
    """`tests/bench.py --gpu` on a CPU says it needs a GPU; with --sizes tiny the same script (real-size stand-ins
    swapped for tiny ones) trains a method 3 steps at its paper setting and times one-step SR, into its table. The
    command line's main() runs here; each method's job, as always, in its own process."""
    import sys
    import bench
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job's process: one thread, as every test's subprocess
    monkeypatch.setattr(sys, "argv", ["tests/bench.py", "--gpu"])
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench.main()
    monkeypatch.setattr(sys, "argv", ["tests/bench.py", "--gpu", "--sizes", "tiny", "--methods", "teasr"])
    bench.main()
    out = capsys.readouterr().out
    assert "| one-step SR to 256 px, s |" in out
    row = next(line for line in out.splitlines() if line.startswith("| teasr"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "qwen-image (-B)" and float(cells[2]) > 0 and float(cells[4]) > 0, out
