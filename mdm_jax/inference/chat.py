"""Talking to an instruct model: the chat template in, answers cut at their end tokens out.

    from mdm_jax.inference import load
    from mdm_jax.inference.chat import ChatSession
    chat = ChatSession(load("runs/sft_mdm"), gen_length=32)
    chat.reply("reverse: king lord love")         # -> "love lord king"
    chat.reply("and now: night day")              # the first exchange stays in the prompt

Each turn's prompt is the history (every earlier prompt, answer and end-of-turn, with the EOS
padding dropped: LLaDA's `chat.py`) followed by the new user turn in the template; the answer
is cut before its first EOS or end-of-turn. The template and its tokens are
`mdm_jax.data.templates`'s, exactly as fine-tuning saw them.
"""

from __future__ import annotations

import dataclasses

from mdm_jax.data import templates
from mdm_jax.data.tokenizer import Tokenizer
from mdm_jax.inference.generate import SamplingError, cut_at, generate
from mdm_jax.inference.mdm import MDMSampler


def end_token_options(sampler: MDMSampler, tok: Tokenizer, no_eos: bool,
                      end_last: bool) -> MDMSampler:
    """`sampler` with LLaDA's end-token options: EOS never generated (`no_eos`), EOS and
    end-of-turn revealed last (`end_last`)."""
    ends = tuple(i for i in (tok.eos_id, tok.eot_id) if i is not None)
    return dataclasses.replace(sampler, forbid_ids=(tok.eos_id,) if no_eos else (),
                               last_ids=ends if end_last else ())


@dataclasses.dataclass
class ChatSession:
    """A multi-turn conversation with a loaded model (`mdm_jax.inference.load`)."""

    loaded: object  # LoadedModel
    tokenizer: Tokenizer | None = None  # default: the model's
    template: str = "chat"
    gen_length: int = 64
    sampler: MDMSampler = dataclasses.field(default_factory=MDMSampler)
    system: str = ""
    seed: int = 0
    history: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.tokenizer is None:
            self.tokenizer = Tokenizer.load(self.loaded.tokenizer_path)
        try:
            templates.check_template(self.tokenizer, self.template)
        except ValueError as e:
            raise SamplingError(str(e)) from None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return templates.stop_ids(self.tokenizer, self.template)

    def prompt_ids(self, user: str) -> list[int]:
        first = not self.history
        return self.history + templates.turn_ids(self.tokenizer, self.template, user, first,
                                                 self.system if first else "")

    def reply(self, user: str) -> str:
        """The model's answer to `user`, given everything said so far."""
        prompt = self.prompt_ids(user)
        limit = self.loaded.config.seq_len
        if len(prompt) + self.gen_length > limit:
            raise SamplingError(
                f"the conversation is {len(prompt)} tokens; with {self.gen_length} to generate "
                f"it is beyond the trained seq_len {limit}: start a new session or lower the "
                f"generation length")
        g = generate(self.loaded.model, self.loaded.params, [prompt], self.gen_length,
                     self.sampler, seed=self.seed + len(self.history), max_length=limit)
        answer = cut_at(g.answers()[0], self.stop_ids)
        self.history = prompt + answer + list(self.stop_ids[:-1])  # end-of-turn kept, no EOS
        return self.tokenizer.decode(answer).strip()
