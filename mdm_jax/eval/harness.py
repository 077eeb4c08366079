"""An lm-evaluation-harness model, `mdm_jax`, and the harness's own CLI with it registered.

    python -m mdm_jax.eval.harness --model mdm_jax \\
        --model_args model=runs/tiny_mdm,cfg=0.5,mc_num=64,mc_batch_size=32 \\
        --tasks my_task --include_path tasks/ --output_path results/

`model_args`: `model` (a run's workdir or an export folder; `workdir` is its old name),
`step`, `estimator` (the family's: mc | llada | chain for MDMs, mc for uniform-state
diffusion, exact for the ARM; default its first), `mc_num` (draws per request),
`mc_batch_size` (draws per chunk: with the seed it fixes the draws; `batch_size` in model_args
is its old name), `cfg`, `eps` (the mc estimator's mask floor; default 0, as SMDM
evaluates), `seed`, `request_batch` (work per network call, from as many
requests: request_batch chunks of mc_batch_size draws, or request_batch prompts of a sampler;
1 is one at a time, the old way; default 16), `greedy_check` (auto | always | never: the
is-greedy flag of loglikelihood requests, which costs an MDM a sampler run; auto skips it for
multiple-choice tasks, whose accuracy does not read it), and for generate_until the sampler:
`steps` (default: one per token), `block_length`, `remasking`, `temperature`, `max_gen_toks`
(when the task gives none). An option the family has no use for (mc_num on the ARM's exact
likelihood, remasking on its sampler), if given, is refused by name, as is a key the model
does not have (all such keys, with the key meant when one is close). Of what lm-eval passes
itself (`--batch_size`, `--max_batch_size`, `--device`, `--trust_remote_code`) none is used.
The CLI checks the requested tasks' YAML and JSONL files first (`tasks.check_task_files`).

Requests are scored together: all loglikelihood requests of a run in calls of request_batch
chunks grouped by length (likelihood.loglikelihoods), greedy checks and greedy MDM generation
(temperature 0, low-confidence remasking: it draws nothing) request_batch prompts per call;
request i draws from seed + i, so a request scores the same in any batch. ARMs score exactly
and generate with the KV cache. Every request's text is tokenized as context + continuation
together and split at the context's tokens (so a leading space stays with the continuation,
as the harness's own models do), after a BOS.
"""

from __future__ import annotations

import difflib
import inspect
import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mdm_jax import families
from mdm_jax.errors import option, spelling
from mdm_jax.eval.likelihood import (
    Estimator,
    EvalError,
    check_estimator,
    greedy_flags,
    loglikelihoods,
    masked_answers,
)

GREEDY_CHECK = {"auto": "auto", "always": "always", "true": "always", "1": "always",
                "yes": "always", "never": "never", "false": "never", "0": "never",
                "no": "never"}
# Old model_args names, read as the new ones with a note on stderr until the next release.
OLD_NAMES = {"workdir": "model", "path": "model", "batch_size": "mc_batch_size"}
# What lm-eval 0.4.13 itself passes, accepted and not used: simple_evaluate's own settings
# beside model_args (--batch_size, --max_batch_size, --device; each only when set; requests
# are batched by request_batch, on the devices JAX sees), and the trust_remote_code=True its
# --trust_remote_code puts into model_args (no code is downloaded here).
LM_EVAL_KEYS = ("batch_size", "max_batch_size", "device")
LM_EVAL_MODEL_ARGS = ("trust_remote_code",)


def _number(key: str, value, kind: type):
    """A model_args value as `kind` (int or float), or an error naming the key as typed."""
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise EvalError(f"model_args {option(key, value)}: give {what}") from None


def _renamed(key: str, value, **old) -> tuple[object, str]:
    """(value, the name the caller typed) of a model_args key that had other names: an old
    name is read as the new one, with a note on stderr; two names at once are an error."""
    given = [(k, v) for k, v in ((key, value), *old.items()) if v is not None]
    if len(given) > 1:
        raise EvalError(f"model_args {' and '.join(k + '=' for k, _ in given)} name the same "
                        f"thing; give only {key}=")
    if not given:
        return None, key
    typed, value = given[0]
    if typed != key:
        print(f"note: model_args {typed}= is now {key}=; the old name works until the next "
              f"release", file=sys.stderr)
    return value, typed


@register_model("mdm_jax")
class MDMJaxLM(LM):
    def __init__(self, model: str | None = None, step=None, estimator: str = "", mc_num=None,
                 mc_batch_size=None, cfg=None, eps=None, seed=0, request_batch=16,
                 greedy_check="auto", steps=None, block_length=None, remasking=None,
                 temperature=0.0, max_gen_toks=64, tokenizer: str | None = None,
                 workdir: str | None = None, path: str | None = None, batch_size=None):
        super().__init__()
        model, _ = _renamed("model", model, workdir=workdir, path=path)
        mc_batch_size, typed = _renamed("mc_batch_size", mc_batch_size, batch_size=batch_size)
        with spelling(batch_size=typed):  # library errors name Estimator.batch_size as typed
            self._configure(model, step, estimator, mc_num, mc_batch_size, cfg, eps, seed,
                            request_batch, greedy_check, steps, block_length, remasking,
                            temperature, max_gen_toks, tokenizer)

    def _configure(self, where, step, estimator, mc_num, mc_batch_size, cfg, eps, seed,
                   request_batch, greedy_check, steps, block_length, remasking, temperature,
                   max_gen_toks, tokenizer) -> None:
        from mdm_jax.data.tokenizer import Tokenizer
        from mdm_jax.inference import load

        if not where:
            raise EvalError("model_args needs model=RUN_OR_EXPORT_FOLDER (a run's workdir or "
                            "an export folder)")
        self.m = load(str(where), None if step in (None, "") else _number("step", step, int))
        self.family = families.get(self.m.args.family)
        given = {"mc_num": mc_num, "batch_size": mc_batch_size, "cfg": cfg, "eps": eps}
        for name in (n for n, v in given.items() if v is not None):
            self.family.check_estimator_option(name)
        for name, value in (("steps", steps), ("block_length", block_length),
                            ("remasking", remasking)):
            if value is not None:
                self.family.check_sampler_option(name)
        self.estimator = check_estimator(Estimator(
            kind=str(estimator or ""),
            mc_num=_number("mc_num", 128 if mc_num is None else mc_num, int),
            batch_size=_number("batch_size", 32 if mc_batch_size is None else mc_batch_size, int),
            cfg=_number("cfg", cfg or 0.0, float),
            eps=None if eps is None else _number("eps", eps, float)), self.family)
        self.seed = _number("seed", seed, int)
        self.request_batch = _number("request_batch", request_batch, int)
        if self.request_batch < 1:
            raise EvalError(f"model_args {option('request_batch', request_batch)}: give 1 or "
                            f"more (1 scores one chunk of draws at a time)")
        self.greedy_check = GREEDY_CHECK.get(str(greedy_check).lower())
        if self.greedy_check is None:
            raise EvalError(f"model_args {option('greedy_check', greedy_check)}: choose auto, "
                            f"always or never")
        self.steps = _number("steps", steps or 0, int)
        self.block_length = _number("block_length", block_length or 0, int)
        self.remasking = str(remasking or "low_confidence")
        self.temperature = _number("temperature", temperature, float)
        self.max_gen_toks = _number("max_gen_toks", max_gen_toks, int)
        self.tok = Tokenizer.load(tokenizer or self.m.tokenizer_path)
        self.max_length = int(self.m.config.seq_len)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """model_args as a dict; an unknown key is an error that names it, a close match and
        the keys. Beside them lm-eval passes only its own settings, which are accepted and not
        used (LM_EVAL_KEYS); any other is refused, since it would change nothing here."""
        keys = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
        shown = [k for k in keys if k not in OLD_NAMES]
        unknown = [k for k in arg_dict if k not in keys and k not in LM_EVAL_MODEL_ARGS]
        if unknown:
            close = [m[0] + "=" for k in unknown if (m := difflib.get_close_matches(k, shown, 1))]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise EvalError(f"model_args {', '.join(k + '=' for k in unknown)}: no such "
                            f"key{'s' if len(unknown) > 1 else ''}{hint}; the keys are "
                            f"{', '.join(shown)}")
        other = [k for k, v in (additional_config or {}).items()
                 if v is not None and k not in LM_EVAL_KEYS]  # None: not set (lm-eval's rule)
        if other:
            raise EvalError(f"{other[0]}= passed beside model_args is not an lm-eval setting "
                            f"mdm_jax knows (those are {', '.join(LM_EVAL_KEYS)}); drop it")
        return cls(**{k: v for k, v in arg_dict.items() if k not in LM_EVAL_MODEL_ARGS})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- tokens -----------------------------------------------------------------------------
    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context, continuation) tokens: BOS + the context, split where the context's own
        tokens end, its start dropped if the pair would not fit (as the harness does)."""
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        if whole[:len(ctx)] != ctx:  # the boundary merged into one piece: score from there
            ctx = ctx[:-1]
        cont = whole[len(ctx):]
        return self._fit([self.tok.bos_id] + ctx, cont), cont

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """Keep the end of a context that would not fit (BOS first), as the harness does."""
        room = self.max_length - len(continuation)
        if room < 1:
            raise EvalError(f"a continuation of {len(continuation)} tokens does not fit the "
                            f"model's {self.max_length}-token sequence")
        return context if len(context) <= room else [context[0]] + context[-(room - 1):]

    # -- the harness's three requests ---------------------------------------------------------
    def greedy_wanted(self, requests) -> list[bool]:
        """Which requests need the is-greedy flag. lm-eval reads it for the `acc` of
        loglikelihood tasks (lambada's) and for the rare `exact_match` of multiple-choice
        ones; auto skips the multiple-choice tasks, recognised by their numbered choices
        (a request idx above 0; a loglikelihood task's are all 0)."""
        if self.greedy_check != "auto":
            return [self.greedy_check == "always"] * len(requests)
        choices = {getattr(r, "task_name", None) for r in requests if getattr(r, "idx", 0)}
        return [getattr(r, "task_name", None) not in choices for r in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [self.pair(*r.args) for r in requests]
        scores = loglikelihoods(self.m.model, self.m.params, pairs, self.estimator,
                                [self.seed + i for i in range(len(pairs))], self.max_length,
                                self.request_batch, progress=not disable_tqdm)
        wanted = [i for i, w in enumerate(self.greedy_wanted(requests)) if w]
        greedy = [False] * len(pairs)
        for i, flag in zip(wanted, greedy_flags(self.m.model, self.m.params,
                                                [pairs[i] for i in wanted], self.max_length,
                                                self.request_batch, self.estimator.cfg),
                           strict=True):
            greedy[i] = flag
        return [(s.logprob, g) for s, g in zip(scores, greedy, strict=True)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """The whole text's log-likelihood: windows of up to seq_len - 1 tokens, each scored
        after a BOS, as `python -m mdm_jax.eval text` scores them (same windows for every
        family, so the figures compare)."""
        from mdm_jax.eval.text import text_nll

        return [-text_nll(self.m.model, self.m.params, self.tok.encode(r.args[0]),
                          self.tok.bos_id, self.max_length, self.estimator, self.seed + i)[0]
                for i, r in enumerate(requests)]

    def _sampler(self, n: int, temperature: float):
        from mdm_jax.inference import MDMSampler

        steps = self.steps or n
        block = self.block_length if self.block_length and n % self.block_length == 0 else 0
        blocks = 1 if not block else n // block
        return MDMSampler(steps=max(blocks, steps - steps % blocks), block_length=block,
                          remasking=self.remasking, temperature=temperature,
                          cfg=self.estimator.cfg)

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Greedy MDM generation (temperature 0, low-confidence remasking: it draws nothing)
        runs request_batch prompts per call; the rest one request at a time from seed + i."""
        from tqdm import tqdm

        from mdm_jax.inference import generate

        jobs = []  # (request, context tokens, tokens to generate, sampler, stop strings)
        for i, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ctx = self._fit([self.tok.bos_id] + self.tok.encode(context), [0] * n)
            sampler = self._sampler(n, float(kwargs.get("temperature", self.temperature)))
            jobs.append((i, ctx, n, sampler, [until] if isinstance(until, str) else until))
        batched = {}
        # batched only where temperature 0 draws nothing: low-confidence remasking (eso's
        # random order, the uniform family's noise and the ARM's one-at-a-time loop do draw)
        if "remasking" in self.family.sampler_options and self.request_batch > 1:
            for i, ctx, n, sampler, _ in jobs:
                if sampler.temperature == 0 and sampler.remasking == "low_confidence":
                    batched.setdefault((n, sampler), []).append((i, ctx))
        answers = {}
        with tqdm(total=len(jobs), disable=disable_tqdm, desc="generate") as bar:
            for (n, sampler), group in batched.items():
                found = masked_answers(self.m.model, self.m.params, [c for _, c in group], n,
                                       sampler, self.max_length, self.request_batch)
                answers.update((i, a) for (i, _), a in zip(group, found, strict=True))
                bar.update(len(group))
            for i, ctx, n, sampler, _ in (j for j in jobs if j[0] not in answers):
                answers[i] = generate(self.m.model, self.m.params, [ctx], n, sampler,
                                      seed=self.seed + i, max_length=self.max_length
                                      ).answers()[0]
                bar.update(1)
        out = []
        for i, _, _, _, until in jobs:
            text = self.tok.decode([t for t in answers[i] if t < self.tok.vocab_size])
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


def _task_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--include_path, --tasks) as lm-eval's CLI reads them (tasks split at commas)."""
    import argparse

    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument("--include_path")
    p.add_argument("--tasks", "-t", nargs="+", default=[])
    try:
        known, _ = p.parse_known_args(argv)
    except argparse.ArgumentError:  # lm-eval's own parser says what is wrong
        return None, []
    return known.include_path, [t for arg in known.tasks for t in arg.split(",") if t]


def main(argv=None) -> None:
    """The harness's own CLI (lm_eval 0.4), with `mdm_jax` registered; errors the user can
    fix (an unknown task, bad model_args, a task file's mistake) are one `error:` line and
    exit code 2. The requested tasks' files are checked before lm-eval reads them."""
    from lm_eval.__main__ import cli_evaluate

    from mdm_jax.errors import UserError, debug, fail
    from mdm_jax.eval.tasks import check_task_files, skipped_yamls

    argv = sys.argv[1:] if argv is None else list(argv)
    include, tasks = _task_args(argv)
    sys.argv = ["lm-eval", *argv]
    try:
        check_task_files(include, tasks)
        cli_evaluate()
    except UserError as e:
        if debug():
            raise
        fail(str(e))
    except ValueError as e:  # the harness's own: an unknown task, a bad argument
        if debug() or not any(s in str(e) for s in ("Tasks not found", "not found",
                                                     "Attempted to load")):
            raise
        said = str(e).strip().splitlines()[0]
        # lm-eval dropped the YAMLs it could not read without a word: name them instead
        skipped = skipped_yamls(include) if include and "Tasks not found" in said else []
        if skipped:
            more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
            fail(f"{skipped[0]}{more}; lm-eval skips such a file, hence: {said}")
        fail(f"{said} (list the tasks with --include_path DIR and `lm-eval ls tasks`)")


if __name__ == "__main__":
    main()
