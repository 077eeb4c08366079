"""The model families mdm_jax trains (config.objective.kind): one declared record each.

A record says what a family is (causal, time-conditioned, with a mask token) and what it has
(objective, sampler, likelihood estimators, export formats, FLOPs terms, plot style). Each
consumer keeps a table keyed by family name: `objectives.OBJECTIVES`, `inference.SAMPLERS`,
`eval.likelihood.SCORERS`, `export.writer.FORMAT_FAMILIES`,
`sft_objectives.SFT_OBJECTIVES`; `tests/test_families.py` walks every
family through all of them. A capability a family lacks is refused here, by `Family.require`.
Kept free of jax so that config, planning and plotting can name families cheaply.
"""

from __future__ import annotations

import dataclasses

from mdm_jax.errors import UserError, option

BASELINE = "arm"  # the family every other one's compute multiplier is measured against


class FamilyError(UserError, ValueError):
    """A family asked for something it does not have; the message says what it has."""


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    summary: str
    # Who attends to whom: "bidirectional" (every token to every token), "causal" (left to
    # right, predicting the next token: the ARM) or "order" (causal along a per-token order
    # with clean tokens first, each token keeping its own position: Eso-LM; mdm_jax/orders.py)
    attention: str
    time_conditioned: bool  # the model reads the noise level (adaLN), not a mask count
    mask_token: bool  # the embedding has a mask-token row (id = vocab_size)
    objective: str  # what it trains on; validation always reports the true bound
    sampler: str  # how it generates
    # Options (keywords, shown as the caller spells them: errors.option) beyond those every
    # family takes: its sampler's beyond gen_length/temperature/top_k/top_p (generate's
    # COMMON_OPTIONS), its likelihood's beyond the estimator's kind (Estimator's fields).
    sampler_options: tuple[str, ...]
    guidance: bool  # unsupervised classifier-free guidance (it masks the context)
    estimators: tuple[str, ...]  # likelihood estimators, the default first
    estimator_options: tuple[str, ...]
    exact_likelihood: bool  # the estimators give log p itself, not a lower bound
    export_formats: tuple[str, ...]
    finetuning: bool  # has a loss restricted to the response of prompt/response pairs (SFT)
    compare_with: tuple[str, ...]  # families the scaling fit measures its compute against
    plot_style: tuple  # matplotlib marker and line style (a name or a dash pattern)

    @property
    def causal(self) -> bool:
        """Next-token prediction: inputs and targets are shifted by one (the ARM)."""
        return self.attention == "causal"

    @property
    def inputs_extra(self) -> int:
        """Tokens per example beyond seq_len that the objective reads (the ARM's shift)."""
        return 1 if self.causal else 0

    @property
    def attention_fraction(self) -> float:
        """Share of the L x L attention scores a token computes usefully (FLOPs accounting)."""
        return 0.5 if self.causal else 1.0

    def require(self, what: str, value: str, offered: tuple[str, ...]) -> None:
        """The one place a missing capability is refused: name the family and what it has."""
        if value not in offered:
            has = ", ".join(offered) if offered else "none"
            raise FamilyError(f"the {self.name} family ({self.summary}) has no {what} "
                              f"{value!r}; it has: {has}")

    def check_finetuning(self) -> None:
        self.require("fine-tuning objective", "sft", ("sft",) if self.finetuning else ())

    def check_estimator(self, kind: str) -> None:
        self.require("likelihood estimator", kind, self.estimators)

    def check_export(self, fmt: str) -> None:
        self.require("export format", fmt, self.export_formats)

    def check_guidance(self) -> None:
        self.require("guidance", option("cfg"), (option("cfg"),) if self.guidance else ())

    def check_sampler_option(self, name: str) -> None:
        """Refuse sampler option `name` (a keyword) unless this family's sampler takes it."""
        self.require(f"option for its sampler ({self.sampler})", option(name),
                     tuple(map(option, self.sampler_options)))

    def check_estimator_option(self, name: str) -> None:
        """Refuse likelihood option `name` (a keyword) unless this family's estimators use it."""
        kinds = ", ".join(self.estimators)
        self.require(f"option for its likelihood estimator{'s' * (len(self.estimators) > 1)} "
                     f"({kinds})", option(name), tuple(map(option, self.estimator_options)))


_MASKED = dict(attention="bidirectional", time_conditioned=False, mask_token=True,
               sampler="masked diffusion: low-confidence or random remasking",
               sampler_options=("steps", "remasking", "block_length", "cfg", "cache",
                                "reveal_order", "forbid_ids", "last_ids"),
               guidance=True, estimators=("mc", "llada", "chain"),
               estimator_options=("mc_num", "batch_size", "cfg", "eps"), exact_likelihood=False,
               export_formats=("litgpt", "llada-hf"), finetuning=True)

RECORDS = (
    Family(name="mdm", summary="masked diffusion, SMDM", objective="1/t-weighted ELBO",
           compare_with=(BASELINE,), plot_style=("o", "-"), **_MASKED),
    Family(name="mdm-ce", summary="masked diffusion on the plain masked cross-entropy",
           objective="masked cross-entropy (validation: the ELBO)",
           compare_with=(BASELINE, "mdm"), plot_style=("^", "-."), **_MASKED),
    Family(name="uniform", summary="uniform-state diffusion", attention="bidirectional",
           time_conditioned=True, mask_token=False, objective="continuous-time NELBO",
           sampler="ancestral (every step may change any answer token)",
           sampler_options=("steps",), guidance=False, estimators=("mc",),
           estimator_options=("mc_num", "batch_size"), exact_likelihood=False,
           export_formats=(), finetuning=False,
           compare_with=(BASELINE,), plot_style=("D", ":")),
    Family(name="eso", summary="interpolating diffusion, Eso-LM", attention="order",
           time_conditioned=False, mask_token=True,
           objective="NELBO: masked diffusion in a random order + left-to-right term",
           sampler="diffusion over a random order, then left to right, with a KV cache",
           sampler_options=("steps", "alpha0", "kv_cache"), guidance=False,
           estimators=("mc",), estimator_options=("mc_num", "batch_size"),
           exact_likelihood=False, export_formats=(), finetuning=False,
           compare_with=(BASELINE, "mdm", "mdm-ce"), plot_style=("v", (0, (5, 1, 1, 1)))),
    Family(name="arm", summary="autoregressive baseline", attention="causal",
           time_conditioned=False,
           mask_token=False, objective="next-token cross-entropy",
           sampler="left to right with a KV cache", sampler_options=("kv_cache",),
           guidance=False, estimators=("exact",), estimator_options=(), exact_likelihood=True,
           export_formats=("llama-hf",), finetuning=True,
           compare_with=(), plot_style=("s", "--")),
)
BY_NAME = {f.name: f for f in RECORDS}
ATTENTION = ("bidirectional", "causal", "order")
assert all(f.attention in ATTENTION for f in RECORDS)
FAMILIES = tuple(BY_NAME)


def eso_batch_split(alpha0: float, batch_split: float) -> float:
    """The interpolating family's share of a batch on the diffusion term (the rest trains the
    left-to-right term): as given, or for -1 the Eso-LM scripts' choice (1 at alpha0 = 1, 0 at
    alpha0 = 0, else 1/2)."""
    if batch_split >= 0:
        return batch_split
    return 1.0 if alpha0 == 1 else 0.0 if alpha0 == 0 else 0.5


def get(name: str) -> Family:
    try:
        return BY_NAME[name]
    except KeyError:
        raise FamilyError(f"unknown family {name!r}; the families are: "
                          f"{', '.join(FAMILIES)}") from None
