"""Export memory and speed, side by side in one run (issue 6).

1. Writes a random-weight checkpoint of a preset (default 336M; full train state, as training
   writes it) once into --workdir.
2. Exports it (`python -m mdm_jax.export`, in a child process) and reads the child's peak RSS:
   target <= 1.5x the parameter bytes (float32).
3. In another child, restores the parameters and saves the same tensors with a plain
   `safetensors.numpy.save_file`, for the MB/s baseline.
4. Imports the export folder back (`python -m mdm_jax.export.load`, a child) and reads its
   peak RSS, also above a child that only imports the libraries.

    python benchmarks/export.py                     # 336M, llada-hf (streamed safetensors)
    python benchmarks/export.py --format litgpt     # adds the .pth state dict
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD_BASELINE = r"""
import json, sys, time
import numpy as np
from absl import logging; logging.set_verbosity(logging.WARNING)
from mdm_jax.export.source import CheckpointParams
from mdm_jax.export.layouts import Dims, tensor_names
from mdm_jax.model import ModelArgs
from safetensors.numpy import save_file
src = CheckpointParams(sys.argv[1])
dims = Dims.from_args(ModelArgs.from_config(src.config))
tensors = {}
for name, entry, layer in tensor_names("llada-hf", dims):
    src.keep_only(entry.leaves)
    tensors[name] = entry.to_torch(dims, *(src.leaf(x, layer) for x in entry.leaves))
t0 = time.perf_counter()
save_file(tensors, sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


CHILD_MAKE = r"""
import os, sys
from absl import logging; logging.set_verbosity(logging.WARNING)
from mdm_jax.checkpoint import Checkpointer
from mdm_jax.config import base_config
from mdm_jax.trainer import Trainer, resolved_config
workdir, preset = sys.argv[1], sys.argv[2]
c = base_config()
c.workdir, c.model.preset, c.model.dtype = workdir, preset, "float32"
c.global_batch, c.seq_len = 1, 128
trainer = Trainer(c)
state = trainer.create_state(0)
ckpt = Checkpointer(workdir)
ckpt.save(1, state, None, resolved_config(c, trainer), {"preset": preset}, force=True)
ckpt.close()
"""


# What an import process holds before it reads a byte: its libraries.
CHILD_IMPORTS = "import jax, torch, transformers, orbax.checkpoint; jax.devices()"


def _child(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS bytes of that child alone, stdout)."""
    import tempfile

    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"{' '.join(cmd)} failed:\n{err.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="336M")
    parser.add_argument("--format", default="llada-hf", choices=("litgpt", "llada-hf"))
    parser.add_argument("--workdir", default="runs/bench_export")
    args = parser.parse_args()
    from mdm_jax import flops
    from mdm_jax.presets import get_preset

    workdir = os.path.join(args.workdir, args.preset)
    # Every step runs in a child, and this process stays small: Linux carries the parent's RSS
    # high-water mark into a forked child's ru_maxrss.
    if not os.path.isdir(os.path.join(workdir, "checkpoints", "1")):
        seconds, _, _ = _child([sys.executable, "-c", CHILD_MAKE, workdir, args.preset])
        print(f"wrote a random {args.preset} train state in {seconds:.0f}s: {workdir}")
    param_bytes = 4 * flops.total_params(get_preset(args.preset))
    out_dir = os.path.join(args.workdir, f"{args.preset}_{args.format}")
    # The baseline runs first so the export's peak is the larger one if memory leaks upward.
    base_s, base_rss, base_out = _child([sys.executable, "-c", CHILD_BASELINE, workdir,
                                         os.path.join(args.workdir, "plain.safetensors")])
    save_s = json.loads(base_out.strip().splitlines()[-1])["seconds"]
    exp_s, exp_rss, _ = _child([sys.executable, "-m", "mdm_jax.export", "--checkpoint", workdir,
                                "--format", args.format, "--out", out_dir,
                                "--max-shard-size", "100GB"])
    mb = param_bytes / 1e6
    print(f"preset {args.preset}: {mb:,.0f} MB of float32 parameters")
    print(f"export ({args.format}) peak RSS {exp_rss / 1e6:,.0f} MB = "
          f"{exp_rss / param_bytes:.2f}x the parameters (target <= 1.5x)")
    print(f"plain restore + save_file peak RSS {base_rss / 1e6:,.0f} MB = "
          f"{base_rss / param_bytes:.2f}x")
    print(f"export wall time {exp_s:.1f}s = {mb / exp_s:,.0f} MB/s end to end (process start, "
          f"checkpoint read, conversion, write)")
    print(f"plain safetensors save_file of the same tensors: {save_s:.1f}s = "
          f"{mb / save_s:,.0f} MB/s (write only); whole child {base_s:.1f}s")
    print(f"ratio export / (plain restore + save) wall time: {exp_s / base_s:.2f}")
    # The import side: the export folder back into a workdir (the weights alone)
    back = os.path.join(args.workdir, f"{args.preset}_{args.format}_imported")
    if os.path.isdir(back):
        import shutil

        shutil.rmtree(back)
    imp_s, imp_rss, _ = _child([sys.executable, "-m", "mdm_jax.export.load", "--format",
                                args.format, "--model", out_dir, "--out", back])
    bare_s, bare_rss, _ = _child([sys.executable, "-c", CHILD_IMPORTS])
    print(f"import ({args.format}) peak RSS {imp_rss / 1e6:,.0f} MB = "
          f"{imp_rss / param_bytes:.2f}x the parameters; "
          f"{(imp_rss - bare_rss) / param_bytes:.2f}x above a process that only imports its "
          f"libraries ({bare_rss / 1e6:,.0f} MB; target <= 1.5x); {imp_s:.1f}s")


if __name__ == "__main__":
    main()
