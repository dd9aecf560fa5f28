"""WebUI-compatible generation parameters ("infotext") in PNG files, so the WebUI's PNG Info tab reads ours.

Format (WebUI 1.10 `create_infotext` / `parse_generation_parameters`)::

    <prompt, possibly several lines>
    Negative prompt: <negative, possibly several lines>      (only when non-empty)
    Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, ..., GCFG terms: "+4 x\\n-1 y"

A value holding ``,``, ``:`` or a line break is written as a JSON string; keys start with a word character and
hold only word characters, spaces, ``-`` and ``/``. The text goes into the PNG ``tEXt`` chunk ``parameters``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, PngImagePlugin

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]*")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE_PREFIX = "Negative prompt:"
PNG_TEXT_KEY = "parameters"


def quote(value: object) -> str:
    """The infotext spelling of `value`: JSON-quoted if it holds ``,``, ``:`` or a line break."""
    text = str(value)
    if any(char in text for char in ",:\n\r"):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_parameters(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """The `parameters` text for one image; None values are left out."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    items = []
    for key, value in params.items():
        if value is None:
            continue
        if not _KEY.fullmatch(key) or key != key.strip():
            raise ValueError(f"infotext key {key!r} must start with a letter/digit and hold only those, ' ', '-', '/'")
        items.append(f"{key}: {quote(value)}")
    lines.append(", ".join(items))
    return "\n".join(lines)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, key → unquoted value) from `parameters` text, read the way the WebUI reads it.

    ``WxH`` values become ``Key-1``/``Key-2`` entries instead, as in the WebUI (``Size`` → ``Size-1``, ``Size-2``).
    """
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    if len(_PARAM.findall(last)) < 3:  # the WebUI's rule: a params line has at least 3 entries
        last = ""
    else:
        lines = lines[:-1]
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        if line.strip().startswith(NEGATIVE_PREFIX):
            target = negative_lines
            line = line.strip()[len(NEGATIVE_PREFIX):].strip()
        target.append(line)
    params: dict[str, str] = {}
    for key, value in _PARAM.findall(last):
        value = value.strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = json.loads(value)
        size = _SIZE.match(value)
        if size:
            params[f"{key}-1"], params[f"{key}-2"] = size.group(1), size.group(2)
        else:
            params[key] = value
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Save `image` as PNG with `parameters` in its ``parameters`` text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_TEXT_KEY, parameters)
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path: str | Path) -> str:
    """The ``parameters`` text of a PNG (KeyError naming the file if it has none)."""
    with Image.open(path) as image:
        image.load()
        text = image.info.get(PNG_TEXT_KEY)
    if text is None:
        raise KeyError(f"{path} has no '{PNG_TEXT_KEY}' text chunk")
    return text
