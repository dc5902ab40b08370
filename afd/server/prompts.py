"""Turn request inputs into prompt token ids: chat messages through the chat template,
completion prompts (text or token ids) through the tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from afd.server.chat_template import load_chat_template, render_chat
from afd.server.errors import BadRequestError
from afd.server.protocol import ChatCompletionRequest, ChatMessage, ToolParam


class PromptBuilder:
    def __init__(
        self,
        tokenizer: Any,
        template_override: str | None,
        max_model_len: Callable[[], int] = lambda: 0,
        model_vocab: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len  # the engine's, once it is up (0: unknown)
        self.template = load_chat_template(None, template_override) if template_override else None
        # ids the model can embed: the tokenizer's, or the model's vocabulary where a
        # checkpoint's is smaller (an id past it crashed the rank that embedded it)
        sizes = [v for v in (getattr(tokenizer, "vocab_size", None), model_vocab) if v]
        self.vocab_size: int | None = min(sizes) if sizes else None

    def render_chat(
        self,
        messages: list[ChatMessage],
        tools: list[ToolParam] | None,
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any],
        template: str | None = None,
    ) -> str:
        """Prompt text for a conversation; template errors are ValueErrors (-> 400)."""
        if not messages:
            raise BadRequestError("messages must not be empty", param="messages")
        dicts = [_message_dict(m) for m in messages]
        tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        source = load_chat_template(None, template) if template else self.template
        if source is None:
            return self.tokenizer.apply_chat_template(
                dicts,
                tools=tool_dicts,
                add_generation_prompt=add_generation_prompt,
                **template_kwargs,
            )
        kwargs = {"bos_token": getattr(self.tokenizer, "bos_token", None) or "", **template_kwargs}
        return render_chat(source, dicts, tool_dicts, add_generation_prompt, **kwargs)

    def render_request(self, req: ChatCompletionRequest, allow_template: bool) -> str:
        """The prompt of a chat request, with its template options applied."""
        if req.continue_final_message and req.add_generation_prompt:
            raise BadRequestError(
                "continue_final_message and add_generation_prompt cannot both be true",
                param="continue_final_message",
            )
        kwargs = dict(req.chat_template_kwargs or {})
        if req.continue_final_message:
            kwargs["continue_final_message"] = True
        extra = req.model_extra or {}
        if extra.get("reasoning_effort") is not None:  # templates may read it (vLLM passes it)
            kwargs.setdefault("reasoning_effort", extra["reasoning_effort"])
        template = extra.get("chat_template")
        if template is not None and not allow_template:
            raise BadRequestError("per-request chat_template is disabled", "chat_template")
        return self.render_chat(
            req.messages, req.tools, req.add_generation_prompt, kwargs, template
        )

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        self.check_size(text)
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if not ids:
            raise BadRequestError("the prompt is empty", param="prompt")
        return self.check_ids(ids)

    def check_size(self, text: str) -> None:
        """400s before tokenizing: a text that is not valid Unicode (a lone surrogate), and a
        text longer than the context could hold if every token stood for the tokenizer's
        longest (`max_token_bytes`): tokenizing megabytes takes seconds of a CPU for a prompt
        that is refused anyway."""
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise BadRequestError(
                f"the prompt is not valid Unicode: {e.reason} at character {e.start}", "prompt"
            ) from None
        limit = self.max_model_len()
        per_token = getattr(self.tokenizer, "max_token_bytes", 0)
        if limit and per_token and size > limit * per_token:
            raise BadRequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"has {size} bytes of text, more than {limit} tokens of at most {per_token} "
                "bytes each hold. Please reduce the length of the prompt.",
                param="input_tokens",
            )

    def completion_prompts(self, prompt: Any, add_special_tokens: bool) -> list[list[int]]:
        """Accept a string, a list of strings, a token-id list or a list of token-id lists."""
        if prompt is None or prompt == [] or prompt == "":
            raise BadRequestError("prompt must be a non-empty string or token list", "prompt")
        if isinstance(prompt, str):
            return [self.encode(prompt, add_special_tokens)]
        if all(isinstance(p, int) for p in prompt):
            return [self.check_ids(prompt)]
        if all(isinstance(p, str) for p in prompt):
            if "" in prompt:  # as a lone "" is: encoded it would be the BOS alone
                raise BadRequestError("prompt must not hold an empty string", "prompt")
            return [self.encode(p, add_special_tokens) for p in prompt]
        return [self.check_ids(p) for p in prompt]

    def check_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        if not ids:
            raise BadRequestError("a token-id prompt must not be empty", param=param)
        bad = [i for i in ids if i < 0 or (self.vocab_size is not None and i >= self.vocab_size)]
        if bad:
            raise BadRequestError(
                f"token id {bad[0]} is out of range [0, {self.vocab_size})", param=param
            )
        return list(ids)


def echo_text(req: ChatCompletionRequest) -> str:
    """With `echo`, a final assistant message is repeated in front of the answer."""
    last = req.messages[-1] if req.messages else None
    if not req.echo or last is None or last.role != "assistant" or not last.content:
        return ""
    if isinstance(last.content, str):
        return last.content
    return "\n".join(p.text or "" for p in last.content if p.type == "text")


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    out = message.model_dump(exclude_none=True)
    # Both names are accepted on input; templates read `reasoning_content` (HF convention).
    reasoning = out.pop("reasoning", None) or out.get("reasoning_content")
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    out.setdefault("content", None)
    return out
