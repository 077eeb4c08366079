"""The README.md model card of an export folder: what the model is and how to use it.

Hugging Face reads the YAML block at the top (library, tags, pipeline); the license is left for
the model's owner to fill in (it depends on the training data, which mdm_jax cannot know). The
facts come from the checkpoint's resolved config and the run's metrics.jsonl: family, preset,
parameters, tokens seen, step, objective and the validation bound at (or before) that step.
"""

from __future__ import annotations

import json

from mdm_jax import families, flops
from mdm_jax.presets import get_preset

PIPELINE = {"llada-hf": "text-generation", "llama-hf": "text-generation", "litgpt": None}


def validation_bound(workdir: str, step: int) -> tuple[int, float, float | None] | None:
    """(step, bound, standard error) of the run's last evaluation at or before `step`."""
    from mdm_jax.plot import PlotError, read_run

    try:
        evals = read_run(workdir).evals
    except (PlotError, KeyError, TypeError):
        return None
    before = [e for e in evals if e[0] <= step]
    return before[-1] if before else None


def usage(fmt: str, repo: str) -> str:
    """Loading and sampling in three lines, in the PyTorch world's own code (mdm_jax for
    litgpt, which transformers does not read)."""
    r = json.dumps(repo)
    prompt = 'torch.tensor([[tok.bos_token_id] + tok("The king").input_ids])'
    if fmt == "llada-hf":  # the folder's config is remote code, for the tokenizer too
        load = f"from_pretrained({r}, trust_remote_code=True)"
        return (f"import torch, transformers\n"
                f"model, tok = transformers.AutoModel.{load}, "
                f"transformers.AutoTokenizer.{load}\n"
                f"print(tok.decode(model.generate({prompt}, gen_length=32, steps=32)[0]))")
    if fmt == "llama-hf":
        return (f"import torch, transformers\n"
                f"model, tok = transformers.AutoModelForCausalLM.from_pretrained({r}), "
                f"transformers.AutoTokenizer.from_pretrained({r})\n"
                f"print(tok.decode(model.generate({prompt}, max_new_tokens=32, "
                f"do_sample=False)[0]))")
    return (f"from mdm_jax.inference import generate_text, load\n"
            f"model = load({r})\n"
            f"print(generate_text(model, \"The king\", gen_length=32, temperature=0))")


def model_card(meta: dict, config, fmt: str, repo: str, workdir: str) -> str:
    """README.md for an export folder: `meta` is mdm_jax.json's record, `config` the run's
    resolved config, `repo` the Hub id (or folder) the usage lines load from."""
    family = families.get(meta["family"])
    preset = get_preset(config.model.preset)
    params = flops.total_params(preset, meta["vocab_size"], meta["family"])
    tokens = meta["step"] * config.global_batch * config.seq_len
    bound = validation_bound(workdir, meta["step"])
    tags = ["mdm_jax", "diffusion" if family.mask_token else "autoregressive",
            f"mdm_jax-{family.name}"]
    head = ["---", "library_name: transformers" if fmt != "litgpt" else "library_name: mdm_jax",
            "tags:", *(f"- {t}" for t in tags)]
    if PIPELINE[fmt]:
        head.append(f"pipeline_tag: {PIPELINE[fmt]}")
    head += ["# license: set the license of this model and its training data here", "---"]
    if bound:
        se = f" ± {bound[2]:.4f}" if bound[2] is not None else ""
        kind = "its negative log-likelihood" if family.exact_likelihood else \
            "an upper bound on its negative log-likelihood"
        bound_line = (f"{bound[1]:.4f}{se} nats per token on held-out data at step "
                      f"{bound[0]:,} ({kind})")
    else:
        bound_line = "not recorded (the run's metrics.jsonl was not found)"
    facts = [("Family", f"{family.name}: {family.summary}"),
             ("Objective", family.objective),
             ("Preset", f"{config.model.preset} ({preset.n_layer} layers, d_model "
                        f"{preset.d_model}, {preset.n_head} heads)"),
             ("Parameters", f"{params:,} ({preset.non_embedding_params:,} non-embedding)"),
             ("Sequence length", f"{config.seq_len:,} tokens"),
             ("Vocabulary", f"{meta['vocab_size']:,} tokens"
                            + (f", mask token id {meta['mask_token_id']}"
                               if meta.get("mask_token_id") is not None else "")),
             ("Training", f"step {meta['step']:,}, {tokens:,} tokens seen "
                          f"({config.global_batch} x {config.seq_len} per step)"),
             ("Validation", bound_line),
             ("Weights", f"{meta['dtype']}, {fmt} layout")]
    body = [f"# {meta['family'].upper()} {config.model.preset}", "",
            f"A language model of the {family.name} family ({family.summary}), trained with "
            f"mdm_jax and exported in its "
            f"`{fmt}` layout.", "",
            "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts), "",
            "## Use", "", "```python", usage(fmt, repo), "```", ""]
    if fmt == "litgpt":
        body.append("The folder also loads in SMDM's `lit_gpt` (`lit_model.pth` and "
                    "`config.json`).")
    else:
        body.append("Prompts start with the tokenizer's BOS, as in mdm_jax's own sampler "
                    "(`python -m mdm_jax.sample`): the tokenizer adds no special token itself "
                    f"(`apply_chat_template` does, for a chat model). Up to {config.seq_len} "
                    f"tokens in all (the trained length).")
    if fmt == "llada-hf":
        body += ["", "`model.generate` is the reverse diffusion process of this folder's "
                 "`generate.py`, with LLaDA's options (`steps`, `gen_length`, `block_length`, "
                 "`remasking`, `temperature`, `cfg_scale`, `logits_eos_inf`, "
                 "`confidence_eos_eot_inf`) and `reveal_order`; unset options take "
                 "`generation_config.json`, the trained run's own sampling settings. At "
                 "temperature 0 it returns the tokens of `python -m mdm_jax.sample` with the "
                 "same settings."]
    body += ["", "## License", "",
             "Not set by the export: add a `license:` line to the YAML header above."]
    return "\n".join(head + [""] + body) + "\n"
