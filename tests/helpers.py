"""Shared by the tests: the repo root, and running a script as a user would, in a fresh process."""
import os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# one thread per process: two torchrun ranks on two cores would otherwise oversubscribe them ~10x
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def run(args, timeout=400, **kw):
    """Run a command from the repo root; fail the test with its output tail if it fails."""
    r = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r
