"""mdm_jax: masked diffusion language models in JAX."""
from mdm_jax import host_memory as _host_memory

__version__ = "0.1.0"
_host_memory.tune()  # before jax allocates: see mdm_jax/host_memory.py
