"""Sniffing a weights file before it is parsed: a file that is evidently something else (empty, an HTML page from a
failed download, a wget log) is refused with a message saying what it looks like, rather than failing deep inside
the unpickler or safetensors. Used by ``beit.checkpoint`` and the tokenizers' loaders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

# The safetensors metadata key under which our exports record tensors_sha256 of their tensors.
SHA256_KEY = "beit_tensors_sha256"


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


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A checksum of a state dict's contents: every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
