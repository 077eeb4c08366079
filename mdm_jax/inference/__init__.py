"""Inference: loading a trained model and sampling from it.

    from mdm_jax.inference import load, generate, MDMSampler
    m = load("runs/tiny_mdm")                                  # or an export folder
    g = generate(m.model, m.params, [[1, 450, 29871]], gen_length=64,
                 sampler=MDMSampler(steps=64, block_length=16, cfg=0.5))
    g.answers(), g.nfe, g.seconds
    generate_text(m, ["KING."], gen_length=32)                  # strings in, strings out

Modules: `loading` (checkpoint or export -> params on a mesh), `mdm` (reverse process,
semi-autoregressive blocks, caching, guidance), `arm` (KV cache and full recompute), `tokens`
(greedy, temperature, top-k, top-p), `generate` (prompts in, answers out), `chat` (an
instruct model's multi-turn session: `ChatSession(load(...)).reply(text)`).
"""

from mdm_jax.inference.chat import ChatSession
from mdm_jax.inference.generate import SAMPLERS, Generation, SamplingError, generate
from mdm_jax.inference.loading import LoadedModel, LoadError, forward, load
from mdm_jax.inference.mdm import REMASKING, MDMSampler
from mdm_jax.inference.text import generate_text

__all__ = ["ChatSession", "Generation", "LoadError", "LoadedModel", "MDMSampler", "REMASKING",
           "SAMPLERS", "SamplingError", "forward", "generate", "generate_text", "load"]
