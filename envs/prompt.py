"""How a prompt becomes the token ids of the env's first observation.

:func:`encode_prompt` is the one place where a prompt becomes token ids: the environment,
SFT, DPO and the reward model all go through it (``rlhf_env.models`` re-exports it), so a
prompt is tokenized the same way everywhere.

A prompt is either a string (one user message) or a list of chat messages
``[{"role": "system" | "user" | "assistant", "content": str}, ...]`` (TRL's conversational
format). With a chat template (SmolLM2) the messages are rendered with the assistant header
after them (``add_generation_prompt=True``); without one (the tiny test model) the message
contents are joined by newlines after the BOS token.

The system message: a prompt's own ``"system"`` message always wins; otherwise
``system_prompt`` decides: :data:`TEMPLATE_DEFAULT` leaves it to the template (SmolLM2's
template then adds "You are a helpful AI assistant named SmolLM, trained by Hugging Face":
the prompt "Hi" is 31 tokens with it, 10 without), a string inserts that system message,
``None`` renders no system message at all. The default stays the template's: the shipped
reward model, SFT and DPO data and the measured demos all encode prompts that way.
"""

from __future__ import annotations

from typing import Any, Sequence


class _TemplateDefault:
    """Sentinel: the chat template's own behaviour (SmolLM2 adds its default system message)."""

    def __repr__(self) -> str:
        return "TEMPLATE_DEFAULT"

    def __reduce__(self):  # pickles (SubprocVecEnv, saved kwargs) to the one instance
        return "TEMPLATE_DEFAULT"


TEMPLATE_DEFAULT: Any = _TemplateDefault()

ROLES = ("system", "user", "assistant", "tool")


def check_messages(prompt: Any, where: str = "prompt") -> None:
    """Raise ``ValueError`` unless ``prompt`` is a non-empty string or a non-empty list of
    ``{"role", "content"}`` messages with string fields."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where} is an empty string; every prompt needs some text")
        return
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(
            f"{where} must be a string or a non-empty list of chat messages "
            f'[{{"role": "user", "content": "..."}}], got {type(prompt).__name__} {str(prompt)[:60]!r}'
        )
    for j, message in enumerate(prompt):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(
                f'{where}[{j}] must be a chat message {{"role": str, "content": str}}, got {str(message)[:80]!r}'
            )
        if message["role"] not in ROLES:
            raise ValueError(f"{where}[{j}] has role {message['role']!r}; use one of {', '.join(ROLES)}")


def is_conversational(prompt: Any) -> bool:
    """True for a list of chat messages (TRL's conversational format), False for a string."""
    return isinstance(prompt, (list, tuple))


def prompt_text(prompt: Any) -> str:
    """A one-string view of a prompt for logs and ``(prompts, responses)`` reward models: the
    string itself, or the content of the last user message of a message list."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


def flat_text(prompt: Any) -> str:
    """The whole prompt as one string for a model without a chat template (the tiny LM, an
    encoder reward model): a string as it is, a message list's contents joined by newlines,
    the system message included."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt)


def as_messages(prompt: Any, system_prompt: Any = TEMPLATE_DEFAULT) -> list[dict[str, str]]:
    """The messages of a prompt with ``system_prompt`` applied where the prompt has no
    system message of its own (a string system prompt is inserted first; ``None`` and
    :data:`TEMPLATE_DEFAULT` insert nothing)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if isinstance(system_prompt, str) and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _render(tokenizer: Any, messages: Sequence[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt, tokenize=False)


def _ids(out: Any) -> list[int]:
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return [int(i) for i in out]


def encode_prompt(tokenizer: Any, prompt: Any, system_prompt: Any = TEMPLATE_DEFAULT) -> list[int]:
    """Token ids of a prompt, ready for the model to write its response after them.

    :param tokenizer: a Hugging Face tokenizer (with or without a chat template)
    :param prompt: a string (one user message) or a list of chat messages
    :param system_prompt: :data:`TEMPLATE_DEFAULT` (the template decides), a string (the
        system message unless the prompt has its own) or ``None`` (no system message)
    :return: a list of token ids
    """
    if isinstance(prompt, str):
        pass
    elif not isinstance(prompt, (list, tuple)):
        raise TypeError(
            "a prompt must be a string or a list of chat messages {'role': ..., 'content': ...}, "
            f"got {type(prompt).__name__}: {str(prompt)[:80]!r}"
        )
    else:
        check_messages(prompt)
    if not (system_prompt is None or system_prompt is TEMPLATE_DEFAULT or isinstance(system_prompt, str)):
        raise TypeError(f"system_prompt must be a string, None (no system message) or TEMPLATE_DEFAULT, got {system_prompt!r}")
    messages = as_messages(prompt, system_prompt)
    if not getattr(tokenizer, "chat_template", None):
        ids = tokenizer(flat_text(messages), add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        return [int(i) for i in ids]
    if system_prompt is not None or any(m["role"] == "system" for m in messages):
        return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    return [int(i) for i in tokenizer(_without_system(tokenizer, messages), add_special_tokens=False)["input_ids"]]


def _without_system(tokenizer: Any, messages: list[dict]) -> str:
    """The rendered conversation with no system turn, also under a template that adds a
    default one (SmolLM2's): render it behind a marker system message and cut that turn off
    (keeping the BOS token a template writes in front of everything)."""
    marker = [{"role": "system", "content": "\x00system\x00"}]
    head = _render(tokenizer, marker, False)
    text = _render(tokenizer, marker + messages, True)
    if not text.startswith(head):
        raise ValueError(
            "system_prompt=None is not supported by this model's chat template (it renders the system turn "
            "differently inside a conversation); pass a system_prompt string instead"
        )
    bos = tokenizer.bos_token
    lead = bos if bos and "bos_token" in tokenizer.chat_template and head.startswith(bos) else ""
    return lead + text[len(head):]


def encode_env_prompt(
    tokenizer: Any, prompt: Any, max_prompt_tokens: int, where: str = "prompt", system_prompt: Any = TEMPLATE_DEFAULT
) -> list[int]:
    """The token ids of ``prompt`` as the env's first observation holds them; an empty
    encoding, or one longer than ``max_prompt_tokens``, is a ``ValueError`` naming ``where``
    and the prompt budget (how many tokens the prompt's text takes and how many the chat
    template and system message add)."""
    ids = encode_prompt(tokenizer, prompt, system_prompt)
    if not ids:
        raise ValueError(f"{where} ({prompt!r}) encodes to zero tokens and the tokenizer has no BOS token")
    if len(ids) > max_prompt_tokens:
        messages = [m for m in as_messages(prompt) if m["role"] != "system"]
        text = sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in messages)
        hint = ""
        if system_prompt is TEMPLATE_DEFAULT and getattr(tokenizer, "chat_template", None) and not any(
            m["role"] == "system" for m in as_messages(prompt)
        ):
            saved = len(ids) - len(encode_prompt(tokenizer, prompt, None))
            if saved > 0:
                hint = f", or system_prompt=None to drop the template's default system message ({saved} tokens)"
        raise ValueError(
            f"{where} is {len(ids)} tokens long after the chat template, more than max_prompt_tokens={max_prompt_tokens}: "
            f"{text} of prompt text and {len(ids) - text} of chat template/system message; shorten it, pass a larger "
            f"max_prompt_tokens{hint} (prompt starts {prompt_text(prompt)[:60]!r})"
        )
    return ids
