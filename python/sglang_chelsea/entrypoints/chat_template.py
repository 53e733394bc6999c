"""Chat templates: the tokenizer's, or ``--chat-template`` (a file, a Jinja string, or a name)."""

from __future__ import annotations

import json
import os
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE}

# Arguments of the tokenizer's apply_chat_template that the server sets itself: a request's
# chat_template_kwargs may not override them.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "chat_template", "tokenize", "add_generation_prompt",
    "continue_final_message", "return_dict", "tools",
})


def load_chat_template(chat_template: str | None, tokenizer: Any) -> str | None:
    """The Jinja template to use: ``chat_template`` if given, else the tokenizer's (or None).

    ``chat_template`` may name a built-in template (``chatml``), be a path to a ``.jinja``
    file (or a JSON file with a ``chat_template`` key), or be the Jinja source itself.
    """
    if chat_template is None:
        return getattr(tokenizer, "chat_template", None) or None
    if chat_template in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[chat_template]
    if os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            source = f.read()
        if chat_template.endswith(".json"):
            source = json.loads(source)["chat_template"]
        return source
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    raise ValueError(f"--chat-template {chat_template!r} is neither a file, a Jinja template, "
                     f"nor one of {sorted(NAMED_TEMPLATES)}")


def apply_chat_template(tokenizer: Any, template: str | None, messages: list[dict[str, Any]],
                        add_generation_prompt: bool = True,
                        continue_final_message: bool = False,
                        template_kwargs: dict[str, Any] | None = None,
                        tools: list[dict[str, Any]] | None = None) -> str:
    """Render ``messages`` (and ``tools``, for templates that show them) to the prompt text
    (ValueError when there is no template).

    ``template_kwargs`` (a request's ``chat_template_kwargs``) become extra template
    variables; naming one of RESERVED_TEMPLATE_KWARGS is a ValueError.
    """
    if template is None:
        raise ValueError("this model has no chat template; start the server with --chat-template")
    kwargs = dict(template_kwargs or {})
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        raise ValueError(f"chat_template_kwargs must not set {', '.join(reserved)} "
                         "(the server sets them)")
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message, tools=tools, **kwargs)
    except ValueError:
        raise
    except Exception as exc:  # a template error (jinja2 raises its own types)
        raise ValueError(f"cannot apply the chat template: {exc}") from exc
