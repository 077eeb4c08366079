"""SMDM model presets (shared/REFERENCE.md section 1), plus tiny ones for tests and CPU demos.

The name is the only handle a config uses; architecture numbers live here and nowhere else.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    n_layer: int
    n_head: int
    d_model: int
    head_dim: int
    mlp_dim: int
    vocab_size: int = 32000
    max_seq_len: int = 2048

    @property
    def non_embedding_params(self) -> int:
        """SMDM's N: block weights + 2 norms per block + final norm (no embedding, no head)."""
        d, i = self.d_model, self.mlp_dim
        attn = 4 * d * self.n_head * self.head_dim  # q, k, v, out (n_head * head_dim == d here)
        return self.n_layer * (attn + 3 * d * i + 2 * d) + d


# name: (layers, heads, d_model, head_dim, mlp_dim)
_SMDM = {
    "6M": (6, 4, 256, 64, 1024),
    "19M": (8, 6, 384, 64, 1536),
    "34M": (8, 8, 512, 64, 2048),
    "48M": (9, 9, 576, 64, 2304),
    "66M": (10, 10, 640, 64, 2560),
    "75M": (16, 8, 640, 80, 1600),
    "85M": (13, 10, 640, 64, 2560),
    "113M": (12, 12, 768, 64, 3072),
    "142M": (15, 12, 768, 64, 3072),
    "170M": (18, 12, 768, 64, 3072),
    "180M": (14, 14, 896, 64, 3584),
    "206M": (16, 14, 896, 64, 3584),
    "231M": (18, 14, 896, 64, 3584),
    "268M": (16, 16, 1024, 64, 4096),
    "302M": (18, 16, 1024, 64, 4096),
    "336M": (20, 16, 1024, 64, 4096),
    "472M": (18, 10, 1280, 128, 5120),
    "551M": (21, 10, 1280, 128, 5120),
    "571M": (18, 11, 1408, 128, 5632),
    "629M": (24, 10, 1280, 128, 5120),
    "666M": (21, 11, 1408, 128, 5632),
    "717M": (19, 12, 1536, 128, 6144),
    "761M": (24, 11, 1408, 128, 5632),
    "831M": (22, 12, 1536, 128, 6144),
    "944M": (25, 12, 1536, 128, 6144),
    "1028M": (20, 14, 1792, 128, 7168),
    "1233M": (24, 14, 1792, 128, 7168),
    "1476M": (22, 16, 2048, 128, 8192),
    "1678M": (25, 16, 2048, 128, 8192),
    "2121M": (28, 17, 2176, 128, 8704),
}

# Small presets for tests (< 1M parameters in total) and the CPU demo. Vocab sizes match the
# tokenizers trained for them; any config may override vocab_size and max_seq_len.
_TINY = {
    "nano": Preset(2, 4, 64, 16, 192, vocab_size=512, max_seq_len=128),
    "tiny": Preset(4, 4, 128, 32, 384, vocab_size=2048, max_seq_len=256),
    "small": Preset(6, 6, 192, 32, 512, vocab_size=2048, max_seq_len=512),
    # head_dim 128 like the SMDM presets from 472M up, at test size (export parity tests)
    "nano-hd128": Preset(1, 2, 256, 128, 256, vocab_size=512, max_seq_len=128),
}

# The micro family for scaling studies that run on a laptop CPU (experiments/isoflop.py:micro):
# head_dim 16, a 512-piece vocabulary and 128-token sequences. The first study used the sizes
# about 2x apart; the second (micro_v2) adds those between them, so that the ladder steps by
# about 1.4-1.6x and depth grows one layer at a time.
_MICRO = {
    "4K": (1, 1, 16, 16, 64),
    "13K": (1, 2, 32, 16, 96),
    "19K": (1, 3, 48, 16, 64),
    "27K": (2, 2, 32, 16, 96),
    "40K": (3, 2, 32, 16, 96),
    "56K": (2, 3, 48, 16, 128),
    "83K": (3, 3, 48, 16, 128),
    "107K": (2, 4, 64, 16, 192),
    "160K": (3, 4, 64, 16, 192),
    "214K": (4, 4, 64, 16, 192),
    "333K": (4, 5, 80, 16, 240),
    "443K": (4, 6, 96, 16, 256),
    "600K": (5, 6, 96, 16, 288),
    "853K": (4, 8, 128, 16, 384),
    "1280K": (6, 8, 128, 16, 384),
}

PRESETS: dict[str, Preset] = {
    **{name: Preset(*spec) for name, spec in _SMDM.items()},
    **_TINY,
    **{name: Preset(*spec, vocab_size=512, max_seq_len=128) for name, spec in _MICRO.items()},
}
ALIASES = {"1.1B": "1028M"}
SMDM_PRESETS = tuple(_SMDM)
MICRO_PRESETS = tuple(_MICRO)


def get_preset(name: str) -> Preset:
    """Return a preset by name, with an error listing the valid names."""
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(
            f"unknown preset {name!r}. Valid presets: "
            f"{', '.join(PRESETS)} (aliases: {', '.join(ALIASES)})."
        )
    return PRESETS[key]
