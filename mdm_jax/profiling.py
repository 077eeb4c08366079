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

from mdm_jax.config import parse_steps


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
