"""LLaDA-style configuration for an mdm_jax masked diffusion model (model_type "llada").

Field names and meanings follow LLaDA's published config.json; fields this architecture does not
use are kept as given, so the same config.json also loads in LLaDA's own code.
"""

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(self, d_model=4096, n_heads=32, n_kv_heads=None, n_layers=32,
                 mlp_hidden_size=None, mlp_ratio=4, vocab_size=126464, embedding_size=None,
                 max_sequence_length=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                 mask_token_id=126336, activation_type="silu", block_type="llama",
                 layer_norm_type="rms", rope=True, alibi=False, include_bias=False,
                 weight_tying=False, use_cache=False, **kwargs):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden_size = mlp_hidden_size or mlp_ratio * d_model
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.mask_token_id = mask_token_id
        self.activation_type = activation_type
        self.block_type = block_type
        self.layer_norm_type = layer_norm_type
        self.rope = rope
        self.alibi = alibi
        self.include_bias = include_bias
        self.weight_tying = weight_tying
        self.use_cache = use_cache
        super().__init__(**kwargs)

    @property
    def hidden_size(self):
        return self.d_model

    @property
    def num_hidden_layers(self):
        return self.n_layers

    @property
    def num_attention_heads(self):
        return self.n_heads
