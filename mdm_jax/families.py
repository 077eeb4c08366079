"""The model families mdm_jax trains (config.objective.kind), and what each needs of the model.

Kept free of jax so that planning tools (flops, scaling.plan) can name families cheaply.
"""

# mdm: SMDM's masked diffusion, trained on its 1/t-weighted ELBO
# mdm-ce: the same model trained on the plain masked cross-entropy (validation: the ELBO)
# uniform: uniform-state diffusion (tokens interpolate towards the uniform distribution)
# arm: the causal autoregressive baseline
FAMILIES = ("mdm", "mdm-ce", "uniform", "arm")


def is_causal(kind: str) -> bool:
    """Only the ARM attends causally; every diffusion family is bidirectional."""
    return kind == "arm"


def is_time_conditioned(kind: str) -> bool:
    """Uniform-state diffusion needs the noise level (a noisy token does not say it is noise);
    a masked model reads the noise level off the mask count, as SMDM's does."""
    return kind == "uniform"
