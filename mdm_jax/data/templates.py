"""Instruction templates: how a dialogue becomes (prompt ids, response ids) pairs.

- `chat`, the shape of LLaDA's Instruct template: BOS, then every message as
  `<|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>`, then the generation prompt
  `<|start_header_id|>assistant<|end_header_id|>\\n\\n`; the answer ends with `<|eot_id|>`
  and EOS. The markers are pieces of our tokenizer (`mdm_jax.data.tokenizer.CHAT_PIECES`).
- `plain`, SMDM's fine-tuning recipes: BOS + the prompt text; the answer ends with EOS.

Each turn's text and each answer are encoded separately and the ids concatenated, in training
and in a chat session alike (a session's next prompt is the previous prompt, the answer and
its end-of-turn, then the new turn: LLaDA's `chat.py`), so the model is asked in exactly the
form it was taught. An n-turn dialogue gives n pairs, pair k holding the first k exchanges in
its prompt (LLaDA's multi-turn expansion).
"""

from __future__ import annotations

from collections.abc import Sequence

from mdm_jax.data.tokenizer import END_OF_TURN, HEADER_END, HEADER_START, Tokenizer

TEMPLATES = ("chat", "plain")
ROLES = ("system", "user", "assistant")


class DialogueError(ValueError):
    """A record whose messages do not form a dialogue; `kind` is its bad-record category."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _header(role: str) -> str:
    return f"{HEADER_START}{role}{HEADER_END}\n\n"


def turn_ids(tok: Tokenizer, template: str, user: str, first: bool, system: str = "") -> list[int]:
    """The prompt segment of one user turn, ending where the answer starts (BOS first when
    it opens the dialogue; a system message only there)."""
    if template == "chat":
        text = (_header("system") + system.strip() + END_OF_TURN if system else "")
        text += _header("user") + user.strip() + END_OF_TURN + _header("assistant")
    else:
        text = (system + "\n" if system else "") + user
    return ([tok.bos_id] if first else []) + tok.encode(text)


def end_ids(tok: Tokenizer, template: str) -> list[int]:
    """What closes an answer: end-of-turn (chat) then EOS."""
    return ([tok.eot_id] if template == "chat" else []) + [tok.eos_id]


def answer_ids(tok: Tokenizer, template: str, answer: str) -> list[int]:
    """The response: the answer's ids and its end markers (the EOS padding comes later)."""
    text = answer.strip() if template == "chat" else answer
    return tok.encode(text) + end_ids(tok, template)


def stop_ids(tok: Tokenizer, template: str) -> tuple[int, ...]:
    """Tokens that end a generated answer (cut there, and stripped)."""
    return tuple(end_ids(tok, template))


def check_template(tok: Tokenizer, template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r}; valid: {', '.join(TEMPLATES)}")
    if template == "chat":
        tok.require_chat_pieces()


def split_dialogue(messages) -> tuple[str, list[tuple[str, str]]]:
    """(system text, [(user, assistant), ...]) of a `messages` list; DialogueError otherwise."""
    if not isinstance(messages, list) or not messages:
        raise DialogueError("bad_messages", "\"messages\" must be a non-empty list")
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ROLES
                and isinstance(m.get("content"), str)):
            raise DialogueError("bad_messages", "every message needs a \"role\" (system, user "
                                                "or assistant) and a string \"content\"")
    system = ""
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m["role"] for m in messages]
    if not messages or roles != ["user", "assistant"] * (len(roles) // 2) or len(roles) % 2:
        raise DialogueError("bad_messages", "messages must alternate user, assistant, ..., "
                                            "ending with the assistant")
    pairs = [(messages[i]["content"], messages[i + 1]["content"])
             for i in range(0, len(messages), 2)]
    if any(not a.strip() for _, a in pairs):
        raise DialogueError("empty_response", "an assistant message is empty")
    return system, pairs


def dialogue_pairs(tok: Tokenizer, template: str, system: str,
                   exchanges: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) for every turn: pair k's prompt is exchanges 0..k-1 (their
    answers without the EOS) and user turn k."""
    out, history = [], []
    for k, (user, answer) in enumerate(exchanges):
        prompt = history + turn_ids(tok, template, user, first=k == 0,
                                    system=system if k == 0 else "")
        response = answer_ids(tok, template, answer)
        out.append((prompt, response))
        history = prompt + response[:-1]  # the answer and its end-of-turn, no EOS
    return out
