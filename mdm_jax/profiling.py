"""`--config.profile.steps=N,M`: a jax.profiler trace of training steps N..M (as logged).

The trace lands in WORKDIR/plugins/profile/<time>/ (one .xplane.pb per host), where TensorBoard's
profile plugin finds it next to the run's metrics: `tensorboard --logdir WORKDIR`. Each traced
step is annotated as a step (StepTraceAnnotation), so the plugin's step-time and overview pages
work on TPU and GPU; on GPU the trace includes the CUDA kernels (CUPTI), on TPU the XLA ops.
Skip the first step or two: they include compilation and the first data reads.
"""

from __future__ import annotations

import contextlib

import jax


def parse_steps(spec: str) -> tuple[int, int] | None:
    """ "N,M" -> (N, M) with 1 <= N <= M; "N" -> (N, N); "" -> None. ValueError otherwise."""
    spec = str(spec).strip()
    if not spec:
        return None
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"config.profile.steps={spec!r}: give 'FIRST,LAST' step numbers, e.g. "
                         f"'10,12', or '' for no trace")
    first, last = int(parts[0]), int(parts[-1])
    if not 1 <= first <= last:
        raise ValueError(f"config.profile.steps={spec!r}: need 1 <= FIRST <= LAST, e.g. '10,12'")
    return first, last


class StepProfiler:
    """Starts the trace before step `first` runs and stops it once step `last` has finished."""

    def __init__(self, spec: str, log_dir: str):
        self.window = parse_steps(spec)
        self.log_dir = log_dir
        self.active = False

    def step(self, number: int):
        """Context for running step `number` (1-based, as logged)."""
        if self.window is None or not self.window[0] <= number <= self.window[1]:
            return contextlib.nullcontext()
        if not self.active:
            jax.profiler.start_trace(self.log_dir)
            self.active = True
        return jax.profiler.StepTraceAnnotation("train", step_num=number)

    def after(self, number: int, outputs) -> bool:
        """Stop after the last traced step, once its work is done; True when it stopped."""
        if self.active and number >= self.window[1]:
            jax.block_until_ready(outputs)
            self.close()
            return True
        return False

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
