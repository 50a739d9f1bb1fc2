"""The prompt sets shipped for calibration and evaluation (``sedac_ray/data/prompts/*.jsonl``).

One JSON object per line: ``{"chat": true, "prompt": "..."}`` for a user message wrapped in the
chat template, ``{"chat": true, "messages": [...]}`` for a whole conversation, or
``{"chat": false, "prompt": "..."}`` for plain text continuation. ``calibration`` is what
``sedac calibrate`` tunes on; ``heldout`` is never used for tuning, only to check the result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

PROMPT_SETS = ("calibration", "heldout")


@dataclass(frozen=True)
class PromptItem:
    prompt: str | tuple[dict, ...]  # text, or a conversation (with chat=True)
    chat: bool


def load_prompts(name_or_path: str) -> list[PromptItem]:
    """A shipped set by name (``calibration``, ``heldout``) or a ``.jsonl`` file of the same format."""
    if name_or_path in PROMPT_SETS:
        text = resources.files("sedac_ray").joinpath(f"data/prompts/{name_or_path}.jsonl").read_text()
        source = f"packaged set {name_or_path!r}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt set {name_or_path!r} is neither {PROMPT_SETS} nor a file")
        text, source = path.read_text(), str(path)
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            chat = bool(entry.get("chat", False))
            if "messages" in entry:
                if not chat:
                    raise ValueError("'messages' needs \"chat\": true")
                prompt = tuple(dict(m) for m in entry["messages"])
            else:
                prompt = str(entry["prompt"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{source}, line {number}: {err}") from None
        items.append(PromptItem(prompt=prompt, chat=chat))
    if not items:
        raise ValueError(f"{source} holds no prompts")
    return items
