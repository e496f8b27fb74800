"""Sniffing a weights file before it is parsed: a file that is evidently something else (empty, an HTML page from a
failed download, a wget log) is refused with a message saying what it looks like, rather than failing deep inside
the unpickler or safetensors. Used by ``beit.checkpoint`` and the tokenizers' loaders."""

from __future__ import annotations

from pathlib import Path


def refuse_non_weights(path: Path) -> None:
    """Refuse files that are evidently not weights, with a message saying what they look like."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise ValueError(f"{path} is empty, not a checkpoint")
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml")):
        raise ValueError(f"{path} is an HTML/XML page (a failed download?), not a checkpoint")
    if text.startswith(b"--") or b"resolving " in text or b"http request sent" in text:
        raise ValueError(f"{path} looks like a wget log (was 'wget -o' used instead of 'wget -O'?), not a checkpoint")
