"""Order-aware attention for the interpolating family (Eso-LM, s-sahoo/Eso-LMs `EsoLMDiT`).

Every token gets a sort key: clean tokens first (keys in [0, 0.9)), masked tokens after them
([1, 1.9)), padding last (>= 3), in random order within each group (Eso-LM (B), `shuffle`) or
left to right. A token may attend to itself and to the tokens whose keys are smaller.

We lay the tokens out physically in key order and run the ordinary causal encoder on them, each
token keeping its own RoPE position (the encoder's `positions`): attention is equivariant under
a permutation that moves the positions with the tokens, so this equals the key mask on the
unpermuted sequence (`key_mask`, tested to 1e-5) and keeps the fast causal kernels (cudnn,
splash) usable. Results stay in the sorted layout; the losses sum over positions, so they need
no scatter back.

The left-to-right ("sequential") term reads 2L tokens: the noisy sequence z and the clean one
x, both in key order, under BD3-LM's block-diagonal mask with block size 1 (`sequential_mask`):
z_i sees itself and x_j for j < i; x_i sees x_j for j <= i. So a masked token sees every clean
token of z and the true tokens of the masked ones before it: p(x_l | z with x_<l filled in).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GROUP_SPAN = 0.9  # offsets within a group stay below the next group's keys
PADDING_KEY = 3.0


def sort_keys(masked_BxL, valid_BxL, uniform_BxL=None,
              masks_left_to_right: bool = False) -> jax.Array:
    """Sort keys [B, L] (float32): clean before masked before padding (valid_BxL False);
    within a group random (by uniform_BxL: U[0, 1) draws, variant B) or, without them, left
    to right; masked tokens always left to right when masks_left_to_right (the sequential
    term)."""
    b, length = masked_BxL.shape
    in_order = jnp.broadcast_to(jnp.linspace(0.0, GROUP_SPAN, length), (b, length))
    offset = in_order if uniform_BxL is None else uniform_BxL * GROUP_SPAN
    if masks_left_to_right:
        offset = jnp.where(masked_BxL, in_order, offset)
    keys = masked_BxL.astype(jnp.float32) + offset
    return jnp.where(valid_BxL, keys, PADDING_KEY + in_order)


def order_of(keys_BxL) -> jax.Array:
    """The sorted layout: order[b, i] = the original position of the i-th token by key."""
    return jnp.argsort(keys_BxL, axis=-1)


def in_order(x_BxL, order_BxL) -> jax.Array:
    """x laid out in the order (a gather along the sequence)."""
    return jnp.take_along_axis(x_BxL, order_BxL, axis=1)


def key_mask(keys_BxL) -> jax.Array:
    """The same attention on the unpermuted sequence: [B, 1, L, L], token i may attend to
    token j iff key_j <= key_i (keys are distinct). For tests and explanation only: it needs
    an explicit mask, which the fused kernels do not take."""
    return (keys_BxL[:, None, :] <= keys_BxL[:, :, None])[:, None]


def diffusion_hidden(apply_fn, params, tokens_BxL, order_BxL) -> jax.Array:
    """Hidden states [B, L, d] in the sorted layout: the tokens gathered by `order` under
    causal attention, each at its original RoPE position."""
    return apply_fn({"params": params}, in_order(tokens_BxL, order_BxL), None,
                    positions=order_BxL)


def sequential_mask(length: int) -> jax.Array:
    """[1, 1, 2L, 2L] bool for the input [z ; x] (both sorted): z_i attends to z_i and x_j,
    j < i; x_i attends to x_j, j <= i."""
    i = jnp.arange(length)[:, None]
    j = jnp.arange(length)[None, :]
    top = jnp.concatenate([i == j, j < i], axis=1)
    bottom = jnp.concatenate([jnp.zeros((length, length), bool), j <= i], axis=1)
    return jnp.concatenate([top, bottom], axis=0)[None, None]


def sequential_hidden(apply_fn, params, z_BxL, x_BxL, order_BxL) -> jax.Array:
    """Hidden states [B, L, d] of the z half (sorted layout) of the 2L sequential pass over
    z and x, both in unsorted layout, ordered by `order` (XLA attention: an explicit mask)."""
    length = z_BxL.shape[1]
    tokens = jnp.concatenate([in_order(z_BxL, order_BxL), in_order(x_BxL, order_BxL)], axis=1)
    positions = jnp.concatenate([order_BxL, order_BxL], axis=1)
    hidden = apply_fn({"params": params}, tokens, None, positions=positions,
                      mask=sequential_mask(length))
    return hidden[:, :length]
