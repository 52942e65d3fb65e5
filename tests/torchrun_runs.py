"""Several command lines of the method scripts, one after another in the same torchrun ranks (for the tests: each rank
imports torch and the methods once, not once per run, and torchrun starts once):

    torchrun --standalone --nproc_per_node=2 tests/torchrun_runs.py JOBS.json

JOBS.json is a list of ["run", "strsr.py", [its flags]] (the script run as `python strsr.py FLAGS` runs it, as
__main__) and ["copy", src, dst] (a folder copied by rank 0 while the other ranks wait). The first run makes the
process group, as a script does; it stays up for the next runs and the copies (gloo cannot make the default group
again on torchrun's store: the new group would read the old one's addresses) and goes at the end. Rank 0 prints
"=== run <i>" before run i, so the caller can split the log by run."""
import json, os, runpy, shutil, sys

import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(path):
    sys.path[0] = ROOT  # as `python strsr.py` has it: the script's folder first
    rank, destroy = int(os.environ["RANK"]), dist.destroy_process_group
    dist.destroy_process_group = lambda *a, **k: None  # each script's common.cleanup() at its end
    try:
        for i, job in enumerate(json.load(open(path))):
            if job[0] == "copy":
                if rank == 0:
                    shutil.copytree(job[1], job[2])
                dist.barrier()
                continue
            _, script, flags = job
            if rank == 0:
                print(f"=== run {i}", flush=True)
            sys.argv = [script, *flags]
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
            sys.stdout.flush()
    finally:
        if dist.is_initialized():
            destroy()


if __name__ == "__main__":
    main(sys.argv[1])
