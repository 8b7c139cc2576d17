"""Reading one field of a row: required fields, text, message content and messages, each bad value a ``RowReject``.

Shared by every layout (:mod:`.formats` for the pair layouts, :mod:`.multi_response` for the multi-response ones),
so a bad prompt, response or message gets the same reason and detail whatever layout it comes in.
"""

from __future__ import annotations

from collections.abc import Mapping

ROLE_MAP = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


class RowReject(Exception):
    """A row that cannot be used; ``reason`` is a code from ``partitioner.data.rejects.REASONS``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def field_value(row: Mapping, key: str):
    """``row[key]``.

    Raises:
        RowReject: ``missing_field`` when the key is absent or null.
    """
    value = row.get(key)
    if value is None:
        raise RowReject("missing_field", f"field {key!r} is missing or null")
    return value


def text_value(value, what: str) -> str:
    """``value`` as text (``what`` names it in the detail).

    Raises:
        RowReject: ``non_text`` (not a string), ``empty_text`` (empty or whitespace by ``str.strip``).
    """
    if not isinstance(value, str):
        raise RowReject("non_text", f"{what} is {type(value).__name__}, expected text")
    if not value.strip():
        raise RowReject("empty_text", f"{what} is empty")
    return value


def content_text(content, what: str) -> str:
    """Message content as text: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                t = part.get("text", part.get("value"))
                if not isinstance(t, str):
                    raise RowReject("non_text", f"{what} has a text part without text")
                texts.append(t)
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise RowReject("non_text", f"{what} has a non-text part ({kind})")
        return "".join(texts)
    if content is None:
        raise RowReject("missing_field", f"{what} has no content")
    raise RowReject("non_text", f"{what} content is {type(content).__name__}, expected text")


def message_value(m, what: str, role_key: str = "role", content_key: str = "content") -> dict:
    """One message as ``{"role", "content"}`` (role mapped by ROLE_MAP, content as text).

    Raises:
        RowReject: ``non_text``, ``missing_field``, ``unknown_role``, or ``empty_text`` (a non-system turn).
    """
    if not isinstance(m, Mapping):
        raise RowReject("non_text", f"{what} is {type(m).__name__}, expected a message object")
    role = m.get(role_key)
    if role is None:
        raise RowReject("missing_field", f"{what} has no {role_key!r}")
    if not isinstance(role, str):
        raise RowReject("non_text", f"{what} {role_key!r} is {type(role).__name__}")
    mapped = ROLE_MAP.get(role.strip().lower())
    if mapped is None:
        raise RowReject("unknown_role", f"{what} has role {role!r}")
    content = content_text(m.get(content_key), what)
    if mapped != "system" and not content.strip():
        raise RowReject("empty_text", f"{what} ({mapped}) has empty content")
    return {"role": mapped, "content": content}


def messages_value(value, what: str, role_key: str = "role", content_key: str = "content") -> list[dict]:
    """A list of messages (one message object counts as a list of one), each as :func:`message_value` reads it.

    Raises:
        RowReject: ``missing_field`` (null), ``non_text`` (not a list), ``empty_text`` (no messages), or a
            message's reject.
    """
    if value is None:
        raise RowReject("missing_field", f"{what} is missing or null")
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise RowReject("non_text", f"{what} is {type(value).__name__}, expected a list of messages")
    if not value:
        raise RowReject("empty_text", f"{what} has no messages")
    return [message_value(m, f"{what}[{i}]", role_key, content_key) for i, m in enumerate(value)]
