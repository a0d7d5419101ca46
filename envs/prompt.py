"""How a prompt becomes the token ids of the env's first observation.

:func:`encode_prompt` is the one place where a prompt becomes token ids: the environment,
SFT, DPO and the reward model all go through it (``rlhf_env.models`` re-exports it), so a
prompt is tokenized the same way everywhere.
"""

from __future__ import annotations

from typing import Any


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt, ready for the model to write its response after them.

    With a chat template (SmolLM2) the prompt becomes one user message followed by the
    assistant header (``add_generation_prompt=True``); otherwise it is the plain text with
    the BOS token in front when the tokenizer defines one.

    :param tokenizer: a Hugging Face tokenizer (e.g. the one ``rlhf_env.load_lm`` returns)
    :param prompt: the user's prompt text
    :return: a list of token ids
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
            out = out["input_ids"]
        return [int(i) for i in out]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return [int(i) for i in ids]


def encode_env_prompt(tokenizer: Any, prompt: str, max_prompt_tokens: int, where: str = "prompt") -> list[int]:
    """The token ids of ``prompt`` as the env's first observation holds them (chat template
    where the model has one); an empty encoding or one longer than ``max_prompt_tokens`` is
    a ``ValueError`` naming ``where``. Shared by the single and the batched env."""
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise ValueError(f"{where} ({prompt!r}) encodes to zero tokens and the tokenizer has no BOS token")
    if len(ids) > max_prompt_tokens:
        raise ValueError(
            f"{where} is {len(ids)} tokens long (after the chat template), more than "
            f"max_prompt_tokens={max_prompt_tokens}: shorten it or pass a larger max_prompt_tokens "
            f"(prompt starts {prompt[:60]!r})"
        )
    return ids
