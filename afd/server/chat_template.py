"""Chat templates: find a checkpoint's Jinja template and render messages with HF conventions.

Also holds the Step3-format default template, used for the tiny model and template-less folders.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Step3 turn format. Tools are described in the system turn; assistant tool calls use Step3's
# markers (the bars are U+FF5C); the generation prompt opens <think> as the model expects.
STEP3_CHAT_TEMPLATE = """\
{{- bos_token }}
{%- set ns = namespace(system=none, start=0) %}
{%- if messages and messages[0].role == 'system' %}
    {%- set ns.system = messages[0].content or '' %}
    {%- set ns.start = 1 %}
{%- endif %}
{%- if tools %}
    {{- '<|BOT|>system\\n' }}
    {%- if ns.system %}
        {{- ns.system + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call the following functions (one JSON description per line):\\n' }}
    {%- for tool in tools %}
        {{- (tool.function if tool.function is defined else tool) | tojson + '\\n' }}
    {%- endfor %}
    {{- '\\nTo call functions, reply with:\\n<｜tool_calls_begin｜><｜tool_call_begin｜>function\
<｜tool_sep｜><steptml:invoke name="FUNCTION_NAME"><steptml:parameter name="PARAMETER_NAME">\
VALUE</steptml:parameter></steptml:invoke><｜tool_call_end｜><｜tool_calls_end｜><|EOT|>' }}
{%- elif ns.system is not none %}
    {{- '<|BOT|>system\\n' + ns.system + '<|EOT|>' }}
{%- endif %}
{%- for message in messages[ns.start:] %}
    {{- '<|BOT|>' + message.role + '\\n' }}
    {%- if message.content %}
        {{- message.content }}
    {%- endif %}
    {%- if message.role == 'assistant' and message.tool_calls %}
        {{- '<｜tool_calls_begin｜>' }}
        {%- for call in message.tool_calls %}
            {%- set fn = call.function if call.function is defined else call %}
            {{- '<｜tool_call_begin｜>function<｜tool_sep｜>' }}
            {{- '<steptml:invoke name="' + fn.name + '">' }}
            {%- for key, value in (fn.arguments or {}).items() %}
                {{- '<steptml:parameter name="' + key + '">' }}
                {{- value if value is string else value | tojson }}
                {{- '</steptml:parameter>' }}
            {%- endfor %}
            {{- '</steptml:invoke><｜tool_call_end｜>' }}
        {%- endfor %}
        {{- '<｜tool_calls_end｜>' }}
    {%- endif %}
    {{- '<|EOT|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|BOT|>assistant\\n<think>\\n' }}
{%- endif %}
"""


class ChatTemplateError(ValueError):
    """A chat template or the messages given to it are invalid (a client or config error)."""


def load_chat_template(model_dir: Path | None, override: str | None = None) -> str:
    """Return the template source: override (a file path or the template itself), else the
    checkpoint's (tokenizer_config.json, chat_template.json, chat_template.jinja), else Step3's."""
    if override is not None:
        if "{" in override:  # Jinja source; a template without any tag would be pointless
            return override
        path = Path(override)
        if not path.is_file():
            raise ChatTemplateError(f"chat template file {path} not found")
        return path.read_text(encoding="utf-8")
    if model_dir is not None:
        found = _template_from_dir(Path(model_dir))
        if found is not None:
            return found
    return STEP3_CHAT_TEMPLATE


def _template_from_dir(model_dir: Path) -> str | None:
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = model_dir / name
        if path.is_file():
            try:
                source = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ChatTemplateError(f"cannot read chat_template from {path}: {e}") from e
            if source:
                return _pick_named(source, path)
    jinja_path = model_dir / "chat_template.jinja"
    return jinja_path.read_text(encoding="utf-8") if jinja_path.is_file() else None


def _pick_named(source: str | list[dict[str, str]], path: Path) -> str:
    # HF allows a list of named templates; "default" is the chat one.
    if isinstance(source, str):
        return source
    named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
    template = named.get("default") or next(iter(named.values()), None)
    if not isinstance(template, str):
        raise ChatTemplateError(f"{path}: chat_template list has no usable 'default' template")
    return template


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # HF's tojson: unlike Jinja's built-in it does not HTML-escape and keeps non-ASCII as is.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a template in HF's sandboxed environment; syntax errors raise ChatTemplateError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error (line {e.lineno}): {e.message}") from e


def render_chat(
    source: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """Render messages (content as string or text parts) into the prompt string."""
    template = compile_template(source)
    context = dict(kwargs.pop("chat_template_kwargs", None) or {})
    context.update(kwargs)
    context.setdefault("bos_token", "")
    context.setdefault("eos_token", "")
    try:
        return template.render(
            messages=normalize_messages(messages),
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            **context,
        )
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check roles, flatten part-list content to a string, and parse tool-call arguments."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{i}] must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{i}] has no 'role'")
        msg = dict(message)
        msg["content"] = _flatten_content(message.get("content"), i)
        if msg.get("tool_calls"):
            msg["tool_calls"] = [_parse_call(c, i, j) for j, c in enumerate(msg["tool_calls"])]
        out.append(msg)
    return out


def _flatten_content(content: Any, i: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatTemplateError(f"messages[{i}].content must be a string or a list of parts")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ChatTemplateError(f"messages[{i}].content: unsupported part type {kind!r}")
    # vLLM joins text parts with newlines when it flattens them for string-format templates.
    return "\n".join(texts)


def _parse_call(call: Any, i: int, j: int) -> dict[str, Any]:
    # Templates (HF convention) expect arguments as a mapping; OpenAI sends a JSON string.
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ChatTemplateError(f"messages[{i}].tool_calls[{j}] needs function.name")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ChatTemplateError(
                f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {e}"
            ) from e
    if args is not None and not isinstance(args, dict):
        raise ChatTemplateError(f"messages[{i}].tool_calls[{j}].function.arguments not an object")
    return {**call, "function": {**fn, "arguments": args or {}}}
