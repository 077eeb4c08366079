"""Fit a run into accelerator memory by compiling it: `micro_batch=auto`, `model.remat=auto`.

XLA knows a compiled step's memory exactly (`compiled.memory_analysis()`), on a real
accelerator and on a target's compile-only devices (mdm_jax.targets). The search compiles the
exact train step for each remat policy from the least recomputation to the most, and for each
bisects the micro-batches (divisors of the global batch that the batch shards divide) for the
largest whose peak (arguments + outputs - aliased + temporaries) fits in (1 - headroom) of the
memory; the first policy with a fit wins (recomputation costs every step; a smaller
micro-batch costs little once a device holds a few thousand tokens). The answer is cached in
the workdir (`autofit.json`). The Trainer class is passed in: no import of the trainer here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable

import jax
import ml_collections

from mdm_jax import config as config_lib
from mdm_jax import storage
from mdm_jax.errors import UserError

REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # least recomputation first
DEFAULT_HEADROOM = 0.1  # runtime buffers, fragmentation; GPUs: XLA's allocator fraction
CACHE_FILE = "autofit.json"


class FitError(UserError, ValueError):
    """No micro-batch and remat policy fit: the message gives the smallest peak found."""

    def __init__(self, message: str, trials: list | None = None):
        super().__init__(message)
        self.trials = trials or []


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device bytes of one compiled step."""
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled) -> Memory:
        m = compiled.memory_analysis()
        return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                   int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                   int(m.generated_code_size_in_bytes))


@dataclasses.dataclass
class Trial:
    micro_batch: int
    remat: str
    memory: Memory
    compile_seconds: float
    fits: bool
    compiled: object = dataclasses.field(default=None, repr=False, compare=False)


def refused_memory(error: Exception) -> Memory:
    """The memory of a step the compiler refused for not fitting (the TPU compiler stops with
    RESOURCE_EXHAUSTED "... HLO temporaries (104.47G) exceeds available HBM ..."): its
    temporaries as the message gives them, a lower bound on the peak. Other errors are bugs."""
    text = str(error)
    found = re.search(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT])\)", text)
    if not found:
        raise error
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[found.group(2)]
    return Memory(0, 0, 0, int(float(found.group(1)) * scale), 0)


def with_choice(c: ml_collections.ConfigDict, micro_batch: int,
                remat: str) -> ml_collections.ConfigDict:
    return config_lib.with_fit(c, micro_batch, remat)


def micro_batch_candidates(c: ml_collections.ConfigDict, batch_shards: int) -> list[int]:
    """Divisors of the global batch that every batch shard gets a whole share of, largest
    first (the global batch itself: no accumulation)."""
    return [m for m in range(c.global_batch, 0, -1)
            if c.global_batch % m == 0 and m % batch_shards == 0]


def compile_step(c: ml_collections.ConfigDict, devices, trainer_cls: Callable):
    """(compiled train step, trainer, seconds) of config c on these devices."""
    trainer = trainer_cls(c, devices=devices)
    t0 = time.perf_counter()
    with trainer.context():
        compiled = trainer.step.lower(*trainer.abstract_step_inputs()).compile()
    return compiled, trainer, time.perf_counter() - t0


def compile_memory(c: ml_collections.ConfigDict, devices, trainer_cls: Callable):
    """(compiled step or None, Memory, seconds): None when the compiler refused the step for
    not fitting, with the memory its message gives."""
    t0 = time.perf_counter()
    try:
        compiled, _, seconds = compile_step(c, devices, trainer_cls)
        return compiled, Memory.of(compiled), seconds
    except jax.errors.JaxRuntimeError as e:
        return None, refused_memory(e), time.perf_counter() - t0


def search(c: ml_collections.ConfigDict, devices, memory_bytes: int, trainer_cls: Callable,
           headroom: float = DEFAULT_HEADROOM, log: Callable = print) -> tuple[Trial, list]:
    """The chosen (micro_batch, remat) trial and every trial compiled on the way."""
    budget = memory_bytes * (1.0 - headroom)
    data, fsdp, _ = config_lib.resolve_mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor,
                                                  len(devices))
    batches = (micro_batch_candidates(c, data * fsdp) if c.micro_batch == config_lib.AUTO
               else [config_lib.micro_batch(c, data * fsdp)])
    remats = REMAT_ORDER if c.model.remat == config_lib.AUTO else (c.model.remat,)
    trials: list[Trial] = []
    memo: dict[tuple[int, str], Trial] = {}

    def trial(mb: int, remat: str) -> Trial:
        if (mb, remat) not in memo:
            compiled, memory, seconds = compile_memory(with_choice(c, mb, remat), devices,
                                                       trainer_cls)
            memo[mb, remat] = t = Trial(mb, remat, memory, seconds, memory.peak <= budget,
                                        compiled)
            trials.append(t)
            log(f"[autofit] micro_batch {mb:>5} remat {remat:<13} peak "
                f"{memory.peak / 2**30:8.2f} GiB {'fits' if t.fits else 'too big'} "
                f"(budget {budget / 2**30:.2f} GiB; compiled in {seconds:.1f}s)")
        return memo[mb, remat]

    def guess(lo: int, hi: int, remat: str) -> int:
        """Next index to compile in batches[lo:hi]: where a line through the peaks compiled so
        far (memory grows about linearly with the micro-batch) crosses the budget, else the
        middle. Usually the global batch, the guess and one check settle it."""
        pts = [(mb, t.memory.peak) for (mb, r), t in memo.items() if r == remat]
        if len(pts) >= 2:
            (x0, y0), (x1, y1) = min(pts), max(pts)
            if x1 > x0 and y1 > y0:
                largest = x0 + (budget - y0) * (x1 - x0) / (y1 - y0)
                for i in range(lo, hi):
                    if batches[i] <= largest:
                        return i
                return hi - 1
        return (lo + hi) // 2

    for remat in remats:
        if not trial(batches[-1], remat).fits:  # not even the smallest micro-batch
            continue
        lo, hi = 0, len(batches) - 1  # batches[hi] fits; find the first (largest) that does
        if lo < hi and trial(batches[0], remat).fits:  # the whole batch: no accumulation
            hi = 0
        elif lo < hi:
            lo = 1
        while lo < hi:
            i = guess(lo, hi, remat)
            if trial(batches[i], remat).fits:
                hi = i
            else:
                lo = i + 1
        return memo[batches[hi], remat], trials
    best = min(trials, key=lambda t: t.memory.peak)
    raise FitError(
        f"config does not fit: the smallest peak found is {best.memory.peak / 2**30:.2f} GiB "
        f"per device (micro_batch {best.micro_batch}, remat {best.remat}) against "
        f"{budget / 2**30:.2f} GiB usable ({memory_bytes / 2**30:.1f} GiB less "
        f"{headroom:.0%} headroom); use more devices, a larger config.mesh.fsdp or tensor, "
        f"or a shorter config.seq_len", trials)


def cache_key(c: ml_collections.ConfigDict, devices) -> str:
    """The config's content (workdir and step counts aside: they do not change memory) and
    the devices it runs on."""
    d = json.loads(c.to_json_best_effort())
    for k in ("workdir", "steps", "seed"):
        d.pop(k, None)
    kinds = sorted({getattr(dev, "device_kind", "?") for dev in devices})
    text = json.dumps([d, kinds, len(devices)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def device_memory_bytes(devices) -> int | None:
    """What the allocator may use on one device, or None where the backend does not say
    (CPU)."""
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def resolve(c: ml_collections.ConfigDict, devices, trainer_cls: Callable,
            headroom: float = DEFAULT_HEADROOM, log: Callable = print) -> ml_collections.ConfigDict:
    """c with auto micro_batch / remat replaced by the fitted values (cached in the workdir);
    c itself when nothing is auto. Where the device has no memory limit (CPU), auto means no
    accumulation and no remat."""
    if not config_lib.wants_fit(c):
        return c
    config_lib.validate(c, len(devices))
    memory = device_memory_bytes(devices)
    if memory is None:
        chosen = with_choice(c, 0 if c.micro_batch == config_lib.AUTO else c.micro_batch,
                             "none" if c.model.remat == config_lib.AUTO else c.model.remat)
        data, fsdp, _ = config_lib.resolve_mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor,
                                                      len(devices))
        log(f"[autofit] {devices[0].platform} reports no memory limit: micro_batch "
            f"{config_lib.micro_batch(chosen, data * fsdp)}, remat {chosen.model.remat}")
        return chosen
    key = cache_key(c, devices)
    path = storage.as_path(storage.join(c.workdir, CACHE_FILE))
    cached = {}
    if path.exists():
        try:
            cached = json.loads(path.read_text())
        except ValueError:  # a torn write: search again and rewrite it
            cached = {}
    if key in cached:
        hit = cached[key]
        log(f"[autofit] micro_batch {hit['micro_batch']}, remat {hit['remat']} "
            f"(cached in {path})")
        return with_choice(c, hit["micro_batch"], hit["remat"])
    best, _ = search(c, devices, memory, trainer_cls, headroom, log)
    log(f"[autofit] chose micro_batch {best.micro_batch}, remat {best.remat}: peak "
        f"{best.memory.peak / 2**30:.2f} GiB of {memory / 2**30:.1f} GiB per device")
    cached[key] = {"micro_batch": best.micro_batch, "remat": best.remat,
                   "peak_bytes": best.memory.peak, "memory_bytes": memory}
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=2))
    return with_choice(c, best.micro_batch, best.remat)
