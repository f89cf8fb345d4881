"""The conversation format the processor, training and inference share (docs/INTERFACES.md, "Conversation records"):
a conversation is a list of messages (or a record dict holding them under "messages"); a message has a role and a
content that is a string or a list of items; an item is text or audio. Parsing only: no torch, no transformers.

Audio items, in the forms the processor accepts: {"type": "audio_url", "audio_url": {"url": ...}} (or the url string
itself), OpenAI's {"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}}, and transformers'
{"type": "audio", "audio" | "path" | "url": ...}.
"""
from __future__ import annotations

from typing import Any

__all__ = ["ROLES", "AUDIO_ITEM_TYPES", "MessageFormatError", "content_items", "audio_reference", "text_of",
           "messages_of", "is_single_conversation"]

ROLES = ("system", "user", "assistant")
AUDIO_ITEM_TYPES = ("audio_url", "audio", "input_audio")


class MessageFormatError(ValueError):
    """A conversation does not follow the message format (the message says where and what)."""


def content_items(content: Any, where: str) -> list:
    """A message's content as a list of items: None -> [], a string -> one text item, a dict -> that one item."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, (list, tuple)):
        raise MessageFormatError(f"{where}: content must be a string or a list of items, got "
                                 f"{type(content).__name__}")
    return list(content)


def audio_reference(item: dict, where: str) -> Any:
    """What an audio item points at: a path, URL or data URI (a string), or whatever a transformers-style item holds
    (an array, an (array, rate) pair, bytes). An input_audio item becomes a data URI."""
    kind = item.get("type")
    if kind == "audio_url":
        value = item.get("audio_url")
        if isinstance(value, dict):
            value = value.get("url")
        if not isinstance(value, str) or not value:
            raise MessageFormatError(f"{where}: an audio_url item needs {{'audio_url': {{'url': path | http(s) URL | "
                                     f"data URI}}}}, got {item!r:.200}")
        return value
    if kind == "input_audio":
        value = item.get("input_audio")
        if not isinstance(value, dict) or not isinstance(value.get("data"), str):
            raise MessageFormatError(f"{where}: an input_audio item needs {{'input_audio': {{'data': base64, "
                                     f"'format': 'wav'}}}}, got {item!r:.200}")
        return f"data:audio/{value.get('format') or 'wav'};base64,{value['data']}"
    for key in ("audio", "path", "url"):
        if item.get(key) is not None:
            return item[key]
    raise MessageFormatError(f"{where}: an audio item needs one of 'audio', 'path' or 'url', got keys "
                             f"{sorted(item)}")


def text_of(content: Any, where: str = "message") -> str:
    """The concatenated text items of a message's content."""
    return "".join(item.get("text", "") for item in content_items(content, where)
                   if isinstance(item, dict) and item.get("type") == "text")


def messages_of(conversation: Any, index: int) -> list:
    """The messages of one conversation (a list of messages or a record dict with 'messages')."""
    if isinstance(conversation, dict):
        if "messages" not in conversation:
            raise MessageFormatError(f"conversation {index}: a dict must hold 'messages' (a JSONL record), got "
                                     f"keys {sorted(conversation)}")
        conversation = conversation["messages"]
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise MessageFormatError(f"conversation {index}: expected a non-empty list of messages, got "
                                 f"{type(conversation).__name__}")
    return list(conversation)


def is_single_conversation(conversations: Any) -> bool:
    """A conversation is a list of message dicts or a record dict with 'messages'; a batch is a list of those."""
    if isinstance(conversations, dict):
        return True
    if isinstance(conversations, (list, tuple)) and conversations:
        first = conversations[0]
        return isinstance(first, dict) and "role" in first
    raise MessageFormatError(f"expected a conversation (list of messages) or a list of conversations, got "
                             f"{type(conversations).__name__}{' (empty)' if not conversations else ''}")
