"""NextChat's mask JSON, both ways: a mask as template fields, a template as a mask.

The shape is NextChat's ``Mask`` (``app/store/mask.ts``, v2.16)::

    {"id": str, "createdAt": int (ms), "avatar": str, "name": str, "hideContext"?: bool,
     "context": [{"id": str, "date": str, "role": "system"|"user"|"assistant", "content": str}],
     "syncGlobalConfig"?: bool, "modelConfig": {"model", "temperature", "top_p", "max_tokens",
     "presence_penalty", "frequency_penalty", "sendMemory", "historyMessageCount", ...},
     "lang": str, "builtin": bool, "plugin"?: [str], ...}

NextChat's masks page exports a list of masks (``masks.json``) and its mask editor one mask; its
import takes either and gives every mask a new id (``useMaskStore.create``). NextChat has no
system prompt field: a mask's system prompt is its first context message with role ``system``,
which is what ``mask_template_fields`` takes as ``system_prompt`` and ``template_mask`` writes
back. Everything else of an imported mask is kept (``ConversationTemplate.nextchat``) and exported
again, so an import then an export gives NextChat the mask it had. Pure functions, no database.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from chatbackend.errors import ApplicationError
from chatbackend.parsers import null_character_path
from chatbackend.text import holds_nul
from conversations.services import MAX_MESSAGE_CHARS, MAX_SYSTEM_PROMPT_CHARS

from .models import PARAMETER_NAMES, ConversationTemplate

MAX_NAME_CHARS = 200
MAX_STARTER_MESSAGES = 100
STARTER_ROLES = ("system", "user", "assistant")
# Parameter ranges (OpenAI's chat completions API): (minimum, maximum, integer only).
PARAMETER_RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, False),
    "top_p": (0.0, 1.0, False),
    "max_tokens": (1, 10_000_000, True),
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
}
# NextChat's ``DEFAULT_CONFIG.modelConfig`` (``app/store/config.ts``): what an exported mask carries
# for a field the template does not set, so NextChat gets a whole ``ModelConfig``.
NEXTCHAT_MODEL_CONFIG_DEFAULTS: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "providerName": "OpenAI",
    "temperature": 0.5,
    "top_p": 1,
    "max_tokens": 4000,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "sendMemory": True,
    "historyMessageCount": 4,
    "compressMessageLengthThreshold": 1000,
    "compressModel": "",
    "compressProviderName": "",
    "enableInjectSystemPrompts": True,
    "template": "{{input}}",
    "size": "1024x1024",
    "quality": "standard",
    "style": "vivid",
}
# NextChat's createdAt is a JavaScript number (Date.now()): exact up to Number.MAX_SAFE_INTEGER.
MAX_SAFE_INTEGER = 2**53 - 1
# Mask keys that become template fields; the others are kept in ``ConversationTemplate.nextchat``.
_MAPPED_KEYS = ("id", "name", "avatar", "lang", "context", "modelConfig", "builtin")
# The ``modelConfig`` parameters NextChat sends with a chat request (``app/client/platforms/openai.ts``),
# which become the template's. Not ``max_tokens``: every mask carries one (4000 by default), which
# NextChat sends only for vision models, and then as at least 4000. Sent with every reply, it was a
# 400 on a model whose context window is smaller, and a reservation and history trim sized for it on
# a model whose output cap is. It stays in ``nextchat``'s ``modelConfig``, exported as it came.
MASK_PARAMETER_NAMES = tuple(name for name in PARAMETER_NAMES if name != "max_tokens")


def _bad(message: str, param: str) -> ApplicationError:
    return ApplicationError(message, code="invalid_mask", param=param)


def starter_messages_clean(messages: Any, *, param: str = "starter_messages") -> list[dict[str, str]]:
    """Return ``messages`` as ``[{"role", "content"}]``: a list of at most ``MAX_STARTER_MESSAGES``
    objects, each with a role of ``STARTER_ROLES`` and non-blank string content of at most
    ``MAX_MESSAGE_CHARS`` characters, without null characters (other keys are dropped).

    Raises ``ApplicationError`` 400 (code ``invalid_starter_messages``, ``param`` naming the item).
    """

    def bad(message: str, at: str) -> ApplicationError:
        return ApplicationError(message, code="invalid_starter_messages", param=at)

    if not isinstance(messages, list):
        raise bad("Must be a list of {role, content} objects.", param)
    if len(messages) > MAX_STARTER_MESSAGES:
        raise bad(f"At most {MAX_STARTER_MESSAGES} messages.", param)
    cleaned = []
    for index, message in enumerate(messages):
        at = f"{param}[{index}]"
        if not isinstance(message, dict):
            raise bad("Each message must be a {role, content} object.", at)
        role, content = message.get("role"), message.get("content")
        if role not in STARTER_ROLES:
            raise bad(f"role must be one of {', '.join(STARTER_ROLES)}.", f"{at}.role")
        if not isinstance(content, str) or not content.strip():
            raise bad("content must be a non-empty string.", f"{at}.content")
        if holds_nul(content) or len(content) > MAX_MESSAGE_CHARS:
            raise bad(
                f"content must hold no null character and at most {MAX_MESSAGE_CHARS} characters.", f"{at}.content"
            )
        cleaned.append({"role": role, "content": content})
    return cleaned


def _parameter(config: dict[str, Any], name: str, param: str) -> float | int | None:
    value = config.get(name)
    if value is None:
        return None
    low, high, integer = PARAMETER_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not float(value).is_integer()):
        raise _bad(f"{name} must be {'an integer' if integer else 'a number'}.", f"{param}.{name}")
    if not low <= value <= high:
        raise _bad(f"{name} must be between {low:g} and {high:g}.", f"{param}.{name}")
    return int(value) if integer else float(value)


def _string(mask: dict[str, Any], key: str, param: str, *, max_length: int) -> str:
    value = mask.get(key, "")
    if not isinstance(value, str) or len(value) > max_length or holds_nul(value):
        raise _bad(f"{key} must be a string of at most {max_length} characters.", f"{param}.{key}")
    return value


def _null_free_check(value: Any, param: str) -> None:
    """Refuse a null character in any string or key of ``value`` (kept as JSON: PostgreSQL's
    ``jsonb`` cannot hold ``\\u0000``). Raises ``ApplicationError`` 400 ``invalid_mask``, ``param``
    the path to the string (or to the object whose key holds it)."""
    path = null_character_path(value)
    if path is not None:
        raise _bad("Null characters are not allowed.", f"{param}.{path}" if path and path[0] != "[" else param + path)


def _kept_fields_check(mask: dict[str, Any], param: str) -> None:
    """Refuse a mask whose fields kept as they are have another JSON type than NextChat's.
    Raises ``ApplicationError`` 400 ``invalid_mask``."""
    created_at = mask.get("createdAt", 0)
    if (
        isinstance(created_at, bool)
        or not isinstance(created_at, int | float)
        or not float(created_at).is_integer()
        or abs(created_at) > MAX_SAFE_INTEGER
    ):
        # A JSON integer beyond 64 bits reaches here as a float (orjson): out of range either way.
        raise _bad(
            f"createdAt must be an integer (Unix milliseconds) between {-MAX_SAFE_INTEGER} and {MAX_SAFE_INTEGER}.",
            f"{param}.createdAt",
        )
    for key in ("hideContext", "syncGlobalConfig", "builtin"):
        if key in mask and not isinstance(mask[key], bool):
            raise _bad(f"{key} must be a boolean.", f"{param}.{key}")
    plugin = mask.get("plugin", [])
    if not (isinstance(plugin, list) and all(isinstance(one, str) for one in plugin)):
        raise _bad("plugin must be a list of strings.", f"{param}.plugin")
    for index, message in enumerate(mask.get("context") or []):
        for key in ("id", "date"):
            if isinstance(message, dict) and key in message and not isinstance(message[key], str):
                raise _bad(f"{key} must be a string.", f"{param}.context[{index}].{key}")


def mask_template_fields(mask: Any, *, param: str = "mask") -> dict[str, Any]:
    """Return the ``ConversationTemplate`` fields of NextChat mask ``mask`` (a parsed JSON value).

    ``name`` is required (NextChat's import skips a mask without one); ``context`` and
    ``modelConfig`` are optional. The first context message, when its role is ``system``, is the
    system prompt; the rest are starter messages. ``param``: where the mask is in the request, for
    errors (e.g. ``masks[2]``). Raises ``ApplicationError`` 400 (``invalid_mask`` or
    ``invalid_starter_messages``, ``param`` naming the field at fault).
    """
    if not isinstance(mask, dict):
        raise _bad("A mask must be a JSON object.", param)
    name = mask.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS or holds_nul(name):
        raise _bad(f"name must be a non-empty string of at most {MAX_NAME_CHARS} characters.", f"{param}.name")
    context = mask.get("context", [])
    if not isinstance(context, list):
        raise _bad("context must be a list of messages.", f"{param}.context")
    system_prompt = ""
    if context and isinstance(context[0], dict) and context[0].get("role") == "system":
        first = context[0].get("content")
        if not isinstance(first, str) or not first.strip() or len(first) > MAX_SYSTEM_PROMPT_CHARS or holds_nul(first):
            raise _bad(
                f"The system message must be a non-empty string of at most {MAX_SYSTEM_PROMPT_CHARS} characters.",
                f"{param}.context[0].content",
            )
        system_prompt, context = first, context[1:]
    starters = starter_messages_clean(context, param=f"{param}.context")
    config = mask.get("modelConfig", {})
    if not isinstance(config, dict):
        raise _bad("modelConfig must be an object.", f"{param}.modelConfig")
    model = config.get("model", "")
    if not isinstance(model, str) or len(model) > 200 or holds_nul(model):
        raise _bad(
            "model must be a string of at most 200 characters, without null characters.", f"{param}.modelConfig.model"
        )
    external_id = mask.get("id", "")
    if not isinstance(external_id, str) or len(external_id) > 100 or holds_nul(external_id):
        raise _bad("id must be a string of at most 100 characters, without null characters.", f"{param}.id")
    _kept_fields_check(mask, param)
    kept = {key: value for key, value in mask.items() if key not in _MAPPED_KEYS}
    if "createdAt" in kept:
        kept["createdAt"] = int(kept["createdAt"])  # 1.7e12 is exported as 1700000000000, as NextChat wrote it
    _parameter(config, "max_tokens", f"{param}.modelConfig")  # kept, but only as NextChat takes it
    kept["modelConfig"] = {key: value for key, value in config.items() if key not in ("model", *MASK_PARAMETER_NAMES)}
    _null_free_check(kept, param)
    return {
        "name": name,
        "system_prompt": system_prompt,
        "model_name": model,
        **{name_: _parameter(config, name_, f"{param}.modelConfig") for name_ in MASK_PARAMETER_NAMES},
        "max_tokens": None,
        "starter_messages": starters,
        "external_id": external_id,
        "avatar": _string(mask, "avatar", param, max_length=100),
        "lang": _string(mask, "lang", param, max_length=16),
        "nextchat": kept,
    }


def masks_parse(document: Any) -> list[dict[str, Any]]:
    """Return the template fields of each mask in ``document``: one mask object, or a list of them
    (NextChat's exported ``masks.json``). Raises ``ApplicationError`` 400 (``param`` ``masks[i]...``
    for a list, ``mask...`` for one object); an empty list is an error too (nothing to import)."""
    if isinstance(document, dict):
        return [mask_template_fields(document)]
    if not isinstance(document, list) or not document:
        raise ApplicationError(
            "Send one NextChat mask (a JSON object) or a non-empty list of them.", code="invalid_mask", param="masks"
        )
    if len(document) > 1000:
        raise ApplicationError("At most 1000 masks at once.", code="invalid_mask", param="masks")
    return [mask_template_fields(mask, param=f"masks[{index}]") for index, mask in enumerate(document)]


def _milliseconds(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1000)


def template_mask(template: ConversationTemplate) -> dict[str, Any]:
    """Return ``template`` as a NextChat mask (see the module): what NextChat's mask import takes.

    The fields an imported mask had and the template does not use come back as they were; a
    ``modelConfig`` field the template leaves unset is NextChat's default.
    """
    kept = dict(template.nextchat or {})
    model_config = {**NEXTCHAT_MODEL_CONFIG_DEFAULTS, **kept.pop("modelConfig", {})}
    if template.model_name:
        model_config["model"] = template.model_name
    model_config.update(template.parameters)
    mask_id = template.external_id or f"chatbackend-{template.pk}"
    created_at = _milliseconds(template.created_at)
    context = []
    if template.system_prompt.strip():  # NextChat, and our import, take no blank message
        context.append({"role": "system", "content": template.system_prompt})
    context.extend(template.starter_messages)
    return {
        "id": mask_id,
        "createdAt": created_at,
        "avatar": template.avatar or "gpt-bot",
        "name": template.name,
        "hideContext": False,
        "syncGlobalConfig": False,
        "plugin": [],
        **kept,
        "context": [
            {"id": f"{mask_id}-{index}", "date": "", "role": message["role"], "content": message["content"]}
            for index, message in enumerate(context)
        ],
        "modelConfig": model_config,
        "lang": template.lang or "en",
        "builtin": False,
    }
