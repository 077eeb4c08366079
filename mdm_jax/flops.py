"""Parameter and FLOP accounting, step planning and MFU (shared/REFERENCE.md section 3).

SMDM convention: C = 6 * N * D with N the non-embedding parameters (no attention, no head), and
steps = int(C / (6 N B L)). The detailed count adds attention and the head, for MFU and for the
3 * F_fwd convention of the Duo study. Everything that plans compute imports from here,
including the one table of accelerator chips (`CHIPS`: peak bf16 FLOP/s, HBM bytes and
bandwidth per device) that MFU, `scaling.plan`, the `aot` roofline and `targets` read.

    python -m mdm_jax.flops --preset 170M --budget 1e19 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re

from mdm_jax import families
from mdm_jax.presets import Preset, get_preset

SMDM_BATCH = 256
SMDM_SEQ_LEN = 2048

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip (one jax device), from its public specification: the one table of
    hardware numbers. FLOPs planning and MFU (here, `scaling.plan`), the roofline (`aot`) and the
    compile-only targets (`targets`: HBM, the GPU compiler's description) all read it."""
    name: str  # the key: `--accelerator`, study.accelerator, targets.Target.accelerator
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bytes: int  # memory per device, as the runtime reports it where known
    hbm_bandwidth: float  # bytes/s per device
    device_kinds: tuple[str, ...]  # lower-case substrings of jax's `device_kind` that name it


# Order matters: a device_kind is matched against each chip's substrings in turn ("TPU v5 lite"
# is a v5e, the v5p reports "TPU v5").
CHIPS = {c.name: c for c in (
    # H100 SXM 80 GB: jax reports "NVIDIA H100 80GB HBM3" and 84,942,979,072 bytes.
    Chip("h100", 989e12, 84_942_979_072, 3.35232e12, ("h100",)),
    # H200 SXM 141 GB: 143,771 MiB reported.
    Chip("h200", 989e12, 143_771 * 1024**2, 4.8e12, ("h200",)),
    # A100 SXM 80 GB (the 40 GB part has the same peak, 40 GiB and 1.56 TB/s).
    Chip("a100", 312e12, 80 * GIB, 2.039e12, ("a100",)),
    Chip("l4", 121e12, 24 * GIB, 3.0e11, ("l4",)),  # GDDR6, not HBM
    Chip("tpu v6e", 918e12, 32 * GIB, 1.64e12, ("tpu v6",)),  # jax: "TPU v6 lite"
    Chip("tpu v5e", 197e12, 16 * GIB, 8.19e11, ("tpu v5 lite", "tpu v5e")),
    Chip("tpu v5p", 459e12, 95 * GIB, 2.765e12, ("tpu v5p", "tpu v5")),  # jax: "TPU v5"
    Chip("tpu v4", 275e12, 32 * GIB, 1.2e12, ("tpu v4",)),
)}


def chip(name_or_device_kind: str) -> Chip | None:
    """The chip a table key or a jax `device_kind` names; None (e.g. CPU) if none does. A
    substring must end a word ("l4" is not the L40S)."""
    kind = name_or_device_kind.lower()
    if kind in CHIPS:
        return CHIPS[kind]
    for c in CHIPS.values():
        if any(re.search(re.escape(s) + "(?![0-9a-z])", kind) for s in c.device_kinds):
            return c
    return None


def non_embedding_params(preset: Preset) -> int:
    return preset.non_embedding_params


def total_params(preset: Preset, vocab_size: int | None = None, family: str = "mdm") -> int:
    """N plus the embedding (vocab + 1 rows with a mask token) and the untied head."""
    v = vocab_size or preset.vocab_size
    rows = v + 1 if families.get(family).mask_token else v
    return preset.non_embedding_params + rows * preset.d_model + preset.d_model * v


# Time conditioning (model.ModelArgs.time_conditioning, uniform-state diffusion): the noise
# level's sinusoidal features and the width of the conditioning vector (model.noise_embedding,
# ModelArgs.cond_dim; a test checks these against the model's parameters).
NOISE_FEATURES = 256
COND_DIM = 128


def time_conditioning_weights(preset: Preset) -> int:
    """Weights applied once per sequence: the noise-level MLP, each block's adaLN (shift, scale
    and gate for attention and MLP: 6 d) and the final one (shift, scale: 2 d); biases aside."""
    return (NOISE_FEATURES * COND_DIM + COND_DIM * COND_DIM
            + preset.n_layer * COND_DIM * 6 * preset.d_model + COND_DIM * 2 * preset.d_model)


def sequential_share(family: str, alpha0: float = 1.0, batch_split: float = -1.0) -> float:
    """The share of a batch's rows that run the interpolating family's 2L left-to-right pass
    (eso at alpha0 < 1: the rows off the diffusion term); 0 for every other family."""
    if family != "eso" or alpha0 == 1:
        return 0.0
    return 1.0 - families.eso_batch_split(alpha0, batch_split)


def flops_per_token_6n(preset: Preset, seq_len: int = SMDM_SEQ_LEN,
                       family: str = "mdm", sequential: float = 0.0) -> float:
    """Training FLOPs per token, SMDM convention: 6 N (plus 6 x the time conditioning's
    weights / L for a time-conditioned model: they run once per sequence); a row on the 2L
    sequential pass (a `sequential` share of them) reads twice the tokens."""
    conditioned = families.get(family).time_conditioned
    extra = 6.0 * time_conditioning_weights(preset) / seq_len if conditioned else 0.0
    return (6.0 * preset.non_embedding_params + extra) * (1.0 + sequential)


def forward_flops_per_token(preset: Preset, seq_len: int, vocab_size: int | None = None,
                            family: str = "mdm", sequential: float = 0.0,
                            attention_scores: bool = True) -> float:
    """Forward matmul FLOPs per token including attention scores/values and the head.

    A bidirectional encoder attends to all L keys; a causal model's useful work is half of that
    (the family's attention_fraction).
    A time-conditioned model adds its conditioning matmuls, which run once per sequence, so
    they cost 1/L of their weights' 2 FLOPs per token.
    A `sequential` share of rows runs eso's 2L pass: twice the weight matmuls, four times the
    attention scores (2L x 2L, all computed under the explicit mask), the head on L.
    attention_scores=False leaves out QK^T and AV, as the uniform/interpolating scaling study
    counts (s-sahoo/scaling-dllms `configs/flops`: calflops does not see its attention).
    """
    v = vocab_size or preset.vocab_size
    d_attn = preset.n_head * preset.head_dim
    dense = 2.0 * (preset.non_embedding_params - preset.n_layer * 2 * preset.d_model
                   - preset.d_model)  # weights only, norms excluded
    f = families.get(family)
    attn = 2.0 * 2.0 * seq_len * d_attn * preset.n_layer * f.attention_fraction
    attn = attn if attention_scores else 0.0
    head = 2.0 * preset.d_model * v
    conditioning = 2.0 * time_conditioning_weights(preset) / seq_len if f.time_conditioned else 0.0
    return (dense * (1.0 + sequential) + attn * (1.0 + 3.0 * sequential) + head
            + conditioning)


def train_flops_per_token(preset: Preset, seq_len: int, vocab_size: int | None = None,
                          family: str = "mdm", sequential: float = 0.0,
                          attention_scores: bool = True) -> float:
    """Detailed training FLOPs per token: 3 x forward (forward + backward)."""
    return 3.0 * forward_flops_per_token(preset, seq_len, vocab_size, family, sequential,
                                         attention_scores)


# FLOP conventions: SMDM's C = 6 N D; the Duo study's 3 x F_fwd (our detailed forward count);
# the uniform/interpolating scaling study's 3 x F_fwd without attention scores.
CONVENTIONS = ("6n", "3fwd", "3fwd-matmul")


def per_token_flops(preset: Preset, seq_len: int, convention: str,
                    vocab_size: int | None = None, family: str = "mdm",
                    sequential: float = 0.0) -> float:
    """Training FLOPs per token under `convention` (one of CONVENTIONS)."""
    if convention == "6n":
        return flops_per_token_6n(preset, seq_len, family, sequential)
    if convention in ("3fwd", "3fwd-matmul"):
        return train_flops_per_token(preset, seq_len, vocab_size, family, sequential,
                                     attention_scores=convention == "3fwd")
    raise ValueError(f"convention={convention!r}; valid: '6n' (SMDM), '3fwd' (Duo) or "
                     f"'3fwd-matmul' (the uniform/interpolating scaling study)")


def steps_for_budget(preset: Preset, budget: float, batch: int = SMDM_BATCH,
                     seq_len: int = SMDM_SEQ_LEN, convention: str = "6n",
                     vocab_size: int | None = None, family: str = "mdm",
                     sequential: float = 0.0) -> int:
    """Optimizer steps that spend `budget` FLOPs under `convention` (CONVENTIONS)."""
    per_token = per_token_flops(preset, seq_len, convention, vocab_size, family, sequential)
    return int(budget / (per_token * batch * seq_len))


def peak_flops(device_kind: str) -> float | None:
    """Per-device dense bf16 peak for a known accelerator; None (e.g. CPU) if unknown."""
    found = chip(device_kind)
    return None if found is None else found.peak_flops


def mfu(achieved_flops_per_s: float, device_kind: str, num_devices: int) -> float | None:
    peak = peak_flops(device_kind)
    return None if peak is None else achieved_flops_per_s / (peak * num_devices)


@dataclasses.dataclass(frozen=True)
class Plan:
    preset: str
    non_embedding_params: int
    total_params: int
    budget: float
    batch: int
    seq_len: int
    steps: int
    tokens: int
    tokens_per_param: float
    flops_per_token_6n: float
    flops_per_token_detailed: float
    convention: str


def plan(name: str, budget: float, batch: int = SMDM_BATCH, seq_len: int = SMDM_SEQ_LEN,
         convention: str = "6n", family: str = "mdm", sequential: float = 0.0) -> Plan:
    preset = get_preset(name)
    if budget <= 0:
        raise ValueError(f"--budget must be a positive number of FLOPs, got {budget}")
    steps = steps_for_budget(preset, budget, batch, seq_len, convention, family=family,
                             sequential=sequential)
    if steps < 1:
        one_step = flops_per_token_6n(preset) * batch * seq_len
        raise ValueError(
            f"budget {budget:.3g} FLOPs buys less than one step of preset {name} at batch "
            f"{batch} x {seq_len} (one step costs {one_step:.3g}); raise the budget or pick a "
            f"smaller preset."
        )
    tokens = steps * batch * seq_len
    return Plan(
        preset=name, non_embedding_params=preset.non_embedding_params,
        total_params=total_params(preset, family=family), budget=budget, batch=batch,
        seq_len=seq_len, steps=steps, tokens=tokens,
        tokens_per_param=tokens / preset.non_embedding_params,
        flops_per_token_6n=flops_per_token_6n(preset, seq_len, family, sequential),
        flops_per_token_detailed=train_flops_per_token(preset, seq_len, family=family,
                                                       sequential=sequential),
        convention=convention,
    )


def _main(argv=None) -> None:
    from mdm_jax.errors import ArgumentParser, UserError

    parser = ArgumentParser(prog="python -m mdm_jax.flops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help="e.g. 170M, 1028M, tiny")
    parser.add_argument("--budget", type=float, required=True, help="training FLOPs, e.g. 1e19")
    parser.add_argument("--batch", type=int, default=SMDM_BATCH, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=SMDM_SEQ_LEN)
    parser.add_argument("--convention", choices=CONVENTIONS, default="6n",
                        help="6n: SMDM; 3fwd: Duo (3 x forward); 3fwd-matmul: without "
                             "attention scores (the uniform/interpolating scaling study)")
    parser.add_argument("--family", choices=families.FAMILIES, default="mdm",
                        help="what it counts: mask-token row, causal attention, conditioning")
    parser.add_argument("--alpha0", type=float, default=1.0,
                        help="eso: below 1, part of each batch runs the 2L left-to-right pass")
    parser.add_argument("--batch-split", type=float, default=-1.0,
                        help="eso: share of rows on the diffusion term (-1: by --alpha0)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.budget) and args.budget > 0):
        raise UserError(f"--budget {args.budget}: give a positive number of training FLOPs, "
                        f"e.g. --budget 1e19")
    for flag, value in (("--batch", args.batch), ("--seq-len", args.seq_len)):
        if value < 1:
            raise UserError(f"{flag} {value}: give a positive integer")
    try:
        result = plan(args.preset, args.budget, args.batch, args.seq_len, args.convention,
                      family=args.family, sequential=sequential_share(
                          args.family, args.alpha0, args.batch_split))
    except ValueError as e:  # an unknown preset, or a budget below one step: named in e
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
    else:
        for key, value in dataclasses.asdict(result).items():
            print(f"{key:>26}: {value:,}" if isinstance(value, int) else f"{key:>26}: {value}")


def cli(argv=None) -> None:
    from mdm_jax.errors import run_main

    run_main(_main, argv)


if __name__ == "__main__":
    cli()
