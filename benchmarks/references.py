"""The reference projects' own code, imported from a checkout outside this repository, and a
check that the machine is quiet enough for a speed ratio to mean something.

    bash benchmarks/fetch_references.sh ../references    # SMDM, LLaDA and SMDM's Python deps

SMDM (ML-GSAI/SMDM) imports CUDA-only extensions at module level. `import_smdm` registers
plain-PyTorch stand-ins for exactly those, computing the same math, and nothing else:
  - `rotary_emb.apply_rotary` (flash-attention's rotary kernel: out1 = x1 cos - x2 sin,
    out2 = x1 sin + x2 cos, with sin negated when `conj`);
  - `xformers.ops.SwiGLU` (w3(silu(w1 x) * w2 x), the weights unpacked as `_pack_weights=False`);
  - `flash_attn.flash_attn_func` (never called on CPU: SMDM then takes torch's SDPA) and
    `flash_attn.losses.cross_entropy.CrossEntropyLoss` (its training loss: torch's);
  - `dropout_layer_norm`, `xentropy_cuda_lib` (imported, never called with the plain
    `RMSNorm`, which is SMDM's own norm class).
Everything else (the model, its attention, RoPE tables, norms and training loss) is SMDM's
code as checked out. LLaDA (ML-GSAI/LLaDA) needs no stand-ins: its `generate.py` and
`get_log_likelihood.py` are imported as they are.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import types
from pathlib import Path

# Other processes may use this much CPU (in cores, averaged over a measurement) before a ratio
# is withheld: PyTorch's OpenMP workers spin while a core is taken from them, and a step then
# runs 10-70x slower where XLA's pool slows in proportion, so the ratio says nothing. A
# quarter of one core is what a shell, an editor and the kernel's workers use at most here.
BUSY_CORES = 0.25


class UsageError(SystemExit):
    """One line on stderr, exit status 2 (the house rule for bad input)."""

    def __init__(self, message: str):
        print(message, file=sys.stderr)
        super().__init__(2)


def _checkout(path: str | os.PathLike, marker: str, name: str, flag: str) -> Path:
    root = Path(path).expanduser().resolve()
    if not (root / marker).is_file():
        raise UsageError(
            f"error: {flag} {path}: no {marker} there; fetch {name} with "
            f"`bash benchmarks/fetch_references.sh ../references` and pass "
            f"{flag} ../references/{name.split('/')[-1]}")
    return root


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _install_smdm_stand_ins() -> None:
    import torch
    import torch.nn.functional as F

    def apply_rotary(x1, x2, cos, sin, out1, out2, conj):
        sin = -sin if conj else sin
        r1, r2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
        # Written through `.data`, as the kernel writes through raw pointers: autograd's version
        # counters do not move (SMDM rotates q and k in place, views of one qkv tensor).
        out1.data.copy_(r1)
        out2.data.copy_(r2)

    class SwiGLU(torch.nn.Module):
        def __init__(self, in_features, hidden_features, out_features=None, bias=True, *,
                     _pack_weights=True):
            super().__init__()
            out_features = out_features or in_features
            self.w1 = torch.nn.Linear(in_features, hidden_features, bias=bias)
            self.w2 = torch.nn.Linear(in_features, hidden_features, bias=bias)
            self.w3 = torch.nn.Linear(hidden_features, out_features, bias=bias)

        def forward(self, x):
            return self.w3(F.silu(self.w1(x)) * self.w2(x))

    def flash_attn_func(*args, **kwargs):
        raise RuntimeError("flash_attn_func is CUDA-only; SMDM uses SDPA on CPU")

    _module("rotary_emb", apply_rotary=apply_rotary)
    _module("xformers")
    sys.modules["xformers"].ops = _module("xformers.ops", SwiGLU=SwiGLU)
    _module("flash_attn", flash_attn_func=flash_attn_func)
    _module("flash_attn.losses")
    _module("flash_attn.losses.cross_entropy", CrossEntropyLoss=torch.nn.CrossEntropyLoss)
    _module("dropout_layer_norm")
    _module("xentropy_cuda_lib")


def smdm_checkout(path: str | os.PathLike) -> Path:
    """The SMDM checkout at `path` (one `error:` line, exit 2, when there is none)."""
    return _checkout(path, "lit_gpt/diffmodel.py", "ML-GSAI/SMDM", "--smdm")


def import_smdm(path: str | os.PathLike) -> types.ModuleType:
    """SMDM's `lit_gpt.diffmodel` (TransEncoder, Config) from checkout `path`. Its Python deps
    (lightning, for `lit_gpt.utils`) are taken from `path/../smdm-deps` when that exists."""
    root = smdm_checkout(path)
    deps = root.parent / "smdm-deps"
    for p in (str(deps), str(root)):
        if Path(p).is_dir() and p not in sys.path:
            sys.path.append(p)  # after this environment's own packages: never shadow them
    _install_smdm_stand_ins()
    try:
        return importlib.import_module("lit_gpt.diffmodel")
    except ModuleNotFoundError as e:
        raise UsageError(
            f"error: SMDM's code needs {e.name!r}; install its Python deps beside the checkout "
            f"with `bash benchmarks/fetch_references.sh {root.parent}`") from None


def import_llada(path: str | os.PathLike, module: str) -> types.ModuleType:
    """LLaDA's `generate` or `get_log_likelihood` module from checkout `path`, as it is."""
    root = _checkout(path, f"{module}.py", "ML-GSAI/LLaDA", "--llada")
    spec = importlib.util.spec_from_file_location(f"llada_{module}", root / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle


def _process_jiffies(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


class Quiet:
    """Measures, over a `with` block, the CPU that processes other than this one (and the
    helper processes `pids` it runs) used, in cores, from /proc/stat less their own CPU time,
    and the load averages at both ends."""

    def __init__(self, pids=()):
        self.pids = [os.getpid(), *pids]

    def __enter__(self):
        self.load_before = os.getloadavg()
        self._tick = os.sysconf("SC_CLK_TCK")
        self._busy0, self._t0 = _busy_jiffies(), time.time()
        self._own0 = sum(map(_process_jiffies, self.pids))
        return self

    def __exit__(self, *exc):
        wall = max(time.time() - self._t0, 1e-9)
        busy = (_busy_jiffies() - self._busy0) / self._tick
        own = (sum(map(_process_jiffies, self.pids)) - self._own0) / self._tick
        self.others_cores = max(busy - own, 0.0) / wall
        self.load_after = os.getloadavg()
        return False

    @property
    def busy(self) -> bool:
        return self.others_cores > BUSY_CORES

    def line(self) -> str:
        verdict = (f"BUSY: other processes used {self.others_cores:.2f} cores (> {BUSY_CORES}); "
                   f"the ratio is withheld" if self.busy else
                   f"quiet: other processes used {self.others_cores:.2f} cores "
                   f"(<= {BUSY_CORES})")
        return (f"machine: {os.cpu_count()} cores, load average {self.load_before[0]:.2f} "
                f"before / {self.load_after[0]:.2f} after (1 min); {verdict}")


def ratio_text(value: float, busy: bool, force: bool) -> str:
    """The ratio, or why it is withheld (`force` prints it anyway, flagged)."""
    if not busy:
        return f"{value:.3f}"
    if force:
        return f"{value:.3f} (MEASURED ON A BUSY MACHINE: not comparable)"
    return "withheld (busy machine; rerun when quiet, or --force)"
