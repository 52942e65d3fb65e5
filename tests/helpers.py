"""Shared by the tests: the repo root, and running a script as a user would, in a fresh process."""
import hashlib, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# one thread per process: two torchrun ranks on two cores would otherwise oversubscribe them ~10x
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def run(args, timeout=400, **kw):
    """Run a command from the repo root; fail the test with its output tail if it fails."""
    r = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def hub_repo(cache, repo, files, sha="0123456789abcdef0123456789abcdef01234567"):
    """A repo in a Hugging Face cache laid out as a download leaves it: refs/main -> snapshots/<sha>/..., each file a
    link to its blob. `files`: {path in the repo: bytes}; returns the snapshot folder."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)
    for path, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / sha / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root / "snapshots" / sha
