"""The chat conversation as every part passes it around: OpenAI's `messages` list."""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]  # {"role": "user", "content": "..."}
Messages = list[Message]
