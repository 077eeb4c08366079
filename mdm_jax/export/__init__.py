"""PyTorch export and import: lit-gpt (SMDM), LLaDA-style and Llama Hugging Face layouts.

`python -m mdm_jax.export` writes a format, `python -m mdm_jax.export.load` reads one back into
an mdm_jax checkpoint; `torch_model.TransEncoder` is a plain-PyTorch reference encoder.
"""
