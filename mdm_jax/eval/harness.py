"""An lm-evaluation-harness model, `mdm_jax`, and the harness's own CLI with it registered.

    python -m mdm_jax.eval.harness --model mdm_jax \\
        --model_args workdir=runs/tiny_mdm,cfg=0.5,mc_num=64,mc_batch_size=32 \\
        --tasks my_task --include_path tasks/ --output_path results/

`model_args`: `workdir` (a run's workdir or an export folder; `path` is the same), `step`,
`estimator` (the family's: mc | llada | chain for MDMs, mc for uniform-state diffusion, exact
for the ARM; default its first), `mc_num`, `mc_batch_size` (Monte Carlo draws per call;
`batch_size` in model_args is its old name), `cfg`,
`seed`, `greedy_check` (false skips the is-greedy flag of loglikelihood requests, which
costs an MDM one sampler run per request; multiple-choice accuracy does not use it), and for
generate_until the sampler: `steps` (default: one per token), `block_length`,
`remasking`, `temperature`, `max_gen_toks` (when the task gives none). ARMs score exactly and
generate with the KV cache. Every request's text is tokenized as context + continuation
together and split at the context's tokens (so a leading space stays with the continuation,
as the harness's own models do), after a BOS.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mdm_jax import families
from mdm_jax.eval.likelihood import Estimator, EvalError, check_estimator, is_greedy, loglikelihood


@register_model("mdm_jax")
class MDMJaxLM(LM):
    def __init__(self, workdir: str | None = None, path: str | None = None, step=None,
                 estimator: str = "", mc_num=128, mc_batch_size=32, cfg=0.0, seed=0, steps=0,
                 block_length=0, remasking: str = "low_confidence", temperature=0.0,
                 max_gen_toks=64, greedy_check=True, tokenizer: str | None = None,
                 batch_size=None, **unused):
        super().__init__()
        from mdm_jax.data.tokenizer import Tokenizer
        from mdm_jax.inference import load

        where = workdir or path
        if not where:
            raise EvalError("model_args needs workdir=RUN_OR_EXPORT_FOLDER")
        self.m = load(str(where), None if step in (None, "") else int(step))
        del batch_size  # lm-eval's requests per batch: requests are scored one at a time
        self.estimator = check_estimator(
            Estimator(kind=str(estimator or ""), mc_num=int(mc_num),
                      batch_size=int(mc_batch_size), cfg=float(cfg)),
            families.get(self.m.args.family))
        self.seed, self.steps, self.block_length = int(seed), int(steps), int(block_length)
        self.remasking, self.temperature = str(remasking), float(temperature)
        self.max_gen_toks = int(max_gen_toks)
        self.greedy_check = str(greedy_check).lower() not in ("0", "false", "no")
        self.tok = Tokenizer.load(tokenizer or self.m.tokenizer_path)
        self.max_length = int(self.m.config.seq_len)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval passes its own `--batch_size` beside `model_args`; a `batch_size` inside
        model_args is the older name of `mc_batch_size` (draws per call) and is read as such."""
        args = dict(arg_dict)
        if "batch_size" in args:
            print("note: model_args batch_size is now mc_batch_size (Monte Carlo draws per "
                  "call); the old name is read as the new one", file=sys.stderr)
            args.setdefault("mc_batch_size", args.pop("batch_size"))
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**args, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- tokens -----------------------------------------------------------------------------
    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        if whole[:len(ctx)] != ctx:  # the boundary merged into one piece: score from there
            ctx = ctx[:-1]
        return [self.tok.bos_id] + ctx, whole[len(ctx):]

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """Keep the end of a context that would not fit (BOS first), as the harness does."""
        room = self.max_length - len(continuation)
        if room < 1:
            raise EvalError(f"a continuation of {len(continuation)} tokens does not fit the "
                            f"model's {self.max_length}-token sequence")
        return context if len(context) <= room else [context[0]] + context[-(room - 1):]

    # -- the harness's three requests ---------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        from tqdm import tqdm

        out = []
        for i, request in enumerate(tqdm(requests, disable=disable_tqdm, desc="loglikelihood")):
            context, continuation = request.args
            ctx, cont = self._split(context, continuation)
            ctx = self._fit(ctx, cont)
            score = loglikelihood(self.m.model, self.m.params, ctx, cont, self.estimator,
                                  seed=self.seed + i, max_length=self.max_length)
            greedy = self.greedy_check and is_greedy(self.m.model, self.m.params, ctx, cont,
                                                     self.max_length)
            out.append((score.logprob, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """The whole text's log-likelihood: windows of up to seq_len - 1 tokens, each scored
        after a BOS, as `python -m mdm_jax.eval text` scores them (same windows for every
        family, so the figures compare)."""
        from mdm_jax.eval.text import text_nll

        return [-text_nll(self.m.model, self.m.params, self.tok.encode(r.args[0]),
                          self.tok.bos_id, self.max_length, self.estimator, self.seed + i)[0]
                for i, r in enumerate(requests)]

    def generate_until(self, requests, disable_tqdm: bool = False):
        from tqdm import tqdm

        from mdm_jax.inference import MDMSampler, generate

        out = []
        for i, request in enumerate(tqdm(requests, disable=disable_tqdm, desc="generate")):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ctx = [self.tok.bos_id] + self.tok.encode(context)
            ctx = self._fit(ctx, [0] * n)
            steps = self.steps or n
            block = self.block_length if self.block_length and n % self.block_length == 0 \
                else 0
            blocks = 1 if not block else n // block
            steps = max(blocks, steps - steps % blocks)
            sampler = MDMSampler(steps=steps, block_length=block, remasking=self.remasking,
                                 temperature=float(kwargs.get("temperature", self.temperature)),
                                 cfg=self.estimator.cfg)
            g = generate(self.m.model, self.m.params, [ctx], n, sampler, seed=self.seed + i,
                         max_length=self.max_length)
            text = self.tok.decode([t for t in g.answers()[0] if t < self.tok.vocab_size])
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


def main(argv=None) -> None:
    """The harness's own CLI (lm_eval 0.4), with `mdm_jax` registered; errors the user can
    fix (an unknown task, bad model_args) are one `error:` line and exit code 2."""
    from lm_eval.__main__ import cli_evaluate

    from mdm_jax.errors import UserError, debug, fail

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except UserError as e:
        if debug():
            raise
        fail(str(e))
    except ValueError as e:  # the harness's own: an unknown task, a bad argument
        if debug() or not any(s in str(e) for s in ("Tasks not found", "not found",
                                                     "Attempted to load")):
            raise
        fail(f"{str(e).strip().splitlines()[0]} (list the tasks with --include_path DIR and "
             f"`lm-eval ls tasks`)")


if __name__ == "__main__":
    main()
