"""Checkpoint interop: official (unilm), timm and Hugging Face layouts to ours and back.

Our parameter names are the official ones, so "unilm" needs little: unwrap ``model``/``module``, drop the derived
``relative_position_index`` buffers. timm is the same plus its non-persistent ``k_bias``. Hugging Face splits qkv
into query/key/value, calls the layer scales ``lambda_1``/``lambda_2`` and the final norm ``layernorm``; its files on
the hub use the transformers 4 names (``beit.encoder.layer.N.attention.attention.query.weight``), transformers 5
renamed them (``beit.layers.N.attention.q_proj.weight``, ``beit.shared_position_bias...``); both are read.

A key bias is dropped wherever one appears: a constant added to every key shifts each row of logits by q . b_k,
which softmax ignores, so BEiT fixes it at zero and dropping it is exact.

Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors: never with arbitrary code execution.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from beit.fileformat import SHA256_KEY, refuse_non_weights, tensors_sha256

SOURCES = ("unilm", "timm", "hf")
EXPORTS = ("unilm", "hf", "hf5")

# Per-layer renames, HF suffix -> ours (q, k, v are joined separately).
_HF4_LAYER = {
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
    "lambda_1": "gamma_1",
    "lambda_2": "gamma_2",
    "attention.attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
}
_HF4_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_HF5_LAYER = {
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "attention.o_proj.weight": "attn.proj.weight",
    "attention.o_proj.bias": "attn.proj.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "lambda_1": "gamma_1",
    "lambda_2": "gamma_2",
    "relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
}
_HF5_QKV = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
_HF_TOP = {
    "beit.embeddings.cls_token": "cls_token",
    "beit.embeddings.mask_token": "mask_token",
    "beit.embeddings.position_embeddings": "pos_embed",
    "beit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "beit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
    # BeitForImageClassification: the pooler's LayerNorm (mean pooling) and the classifier.
    "beit.pooler.layernorm.weight": "fc_norm.weight",
    "beit.pooler.layernorm.bias": "fc_norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_HF4_SHARED = "beit.encoder.relative_position_bias.relative_position_bias_table"
_HF5_SHARED = "beit.shared_position_bias.relative_position_bias_table"
_OURS_SHARED = "rel_pos_bias.relative_position_bias_table"


def unwrap_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """Take the weights out of a training checkpoint (``model``/``module``/``state_dict`` entries) and strip the
    ``module.`` prefix that DistributedDataParallel adds."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"expected a state dict (a dict of tensors), got {type(state_dict).__name__}")
    for key in ("model", "module", "state_dict", "model_state"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            continue  # optimizer steps, args and the like travel beside the weights in training checkpoints
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def detect_source(state_dict: dict[str, torch.Tensor]) -> str:
    """Guess the layout of an unwrapped state dict: "hf" or "unilm" (timm shares the unilm names)."""
    if any(k.startswith("beit.") for k in state_dict):
        return "hf"
    if any(k.startswith("blocks.") or k.startswith("patch_embed.") for k in state_dict):
        return "unilm"
    raise ValueError(
        "cannot tell the checkpoint layout: no 'beit.*' (Hugging Face) and no 'blocks.*'/'patch_embed.*' "
        f"(official or timm) keys; first keys: {list(state_dict)[:5]}"
    )


def _from_unilm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith("relative_position_index") or k.endswith("attn.k_bias"):
            continue  # derived from the window / a constant zero (see the module docstring)
        m = re.fullmatch(r"(blocks\.\d+\.attn)\.qkv\.bias", k)
        if m:
            # Some ports keep one packed qkv bias: split it into the learned q and v biases.
            q_bias, _, v_bias = v.chunk(3)
            out[f"{m.group(1)}.q_bias"] = q_bias
            out[f"{m.group(1)}.v_bias"] = v_bias
            continue
        out[k] = v
    return out


def _from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "beit.layernorm.weight" in sd and "layernorm.weight" in sd:
        raise ValueError(
            "this Hugging Face checkpoint applies two final LayerNorms (use_mean_pooling=False with a MIM head); "
            "the official BEiT has one, so it cannot be converted faithfully"
        )
    v5 = any(k.startswith("beit.layers.") for k in sd)
    layer_map, qkv_names, prefix = (
        (_HF5_LAYER, _HF5_QKV, "beit.layers.") if v5 else (_HF4_LAYER, _HF4_QKV, "beit.encoder.layer.")
    )
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    layer_re = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    for k, v in sd.items():
        if k.endswith("relative_position_index"):
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        if k in (_HF4_SHARED, _HF5_SHARED):
            out[_OURS_SHARED] = v
            continue
        if k.startswith("beit.layernorm."):
            out["norm." + k.split(".")[-1]] = v  # a BeitModel without mean pooling: its final norm
            continue
        m = layer_re.fullmatch(k)
        if m is None:
            out[k] = v  # pooler, classifier, ...: reported as unexpected on load
            continue
        i, rest = int(m.group(1)), m.group(2)
        for j, name in enumerate(qkv_names):
            if rest.startswith(name + "."):
                qkv.setdefault(i, {})[f"{'qkv'[j]}.{rest[len(name) + 1 :]}"] = v
                break
        else:
            out[f"blocks.{i}.{layer_map.get(rest, rest)}"] = v
    for i, parts in sorted(qkv.items()):
        missing = [p for p in ("q.weight", "k.weight", "v.weight") if p not in parts]
        if missing:
            raise ValueError(f"layer {i} of the Hugging Face checkpoint lacks {', '.join(missing)}")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["q.weight"], parts["k.weight"], parts["v.weight"]], 0)
        if "q.bias" in parts:
            out[f"blocks.{i}.attn.q_bias"] = parts["q.bias"]
        if "v.bias" in parts:
            out[f"blocks.{i}.attn.v_bias"] = parts["v.bias"]
        # "k.bias" (absent on the hub) is dropped: see the module docstring.
    return out


def convert_state_dict(state_dict: dict, src: str = "auto", model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Convert an official ("unilm"), "timm" or Hugging Face ("hf", transformers 4 or 5 names) state dict to our
    names. ``src="auto"`` detects the layout. With ``model`` the result is also fitted to it: a shared relative
    position table is copied into every block when the model has per-block tables only (as the official
    fine-tuning loader does), and shapes are checked (``ValueError`` naming every mismatch)."""
    sd = unwrap_state_dict(state_dict)
    if src == "auto":
        src = detect_source(sd)
    if src not in SOURCES:
        raise ValueError(f"unknown checkpoint source {src!r}: expected one of {', '.join(SOURCES)} or 'auto'")
    out = _from_hf(sd) if src == "hf" else _from_unilm(sd)
    if model is not None:
        out = fit_state_dict(out, model)
    return out


def fit_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapt a state dict in our names to ``model`` and check the shapes of every key both hold."""
    target = model.state_dict()
    sd = dict(sd)
    block_tables = [k for k in target if re.fullmatch(r"blocks\.\d+\.attn\.relative_position_bias_table", k)]
    if _OURS_SHARED in sd and block_tables and not any(k in sd for k in block_tables):
        shared = sd.pop(_OURS_SHARED) if _OURS_SHARED not in target else sd[_OURS_SHARED]
        for k in block_tables:
            sd[k] = shared.clone()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if mismatched:
        hint = ""
        if any("relative_position_bias_table" in m or "pos_embed" in m or "patch_embed" in m for m in mismatched):
            hint = " (a checkpoint for another image or patch size? build the model with the matching img_size)"
        raise ValueError("checkpoint shapes do not match the model" + hint + ":\n  " + "\n  ".join(mismatched))
    return sd


def is_classifier(model: nn.Module) -> bool:
    """A fine-tuning classifier (``beit.classifier.VisionTransformer`` or one like it): it has a ``head`` to reset."""
    return hasattr(model, "head") and callable(getattr(model, "reset_classifier", None))


def export_state_dict(model: nn.Module, dst: str = "unilm") -> dict[str, torch.Tensor]:
    """Our model's weights in another layout: "unilm" (the official one, ``relative_position_index`` buffers
    included so the official code loads it strictly), "hf" (the transformers 4 names of the files on the hub,
    which transformers 5 also reads) or "hf5" (the transformers 5 module names).

    A MIM model maps to ``BeitForMaskedImageModeling``, a classifier to ``BeitForImageClassification``: its
    ``fc_norm`` is the pooler's LayerNorm (``beit.pooler.layernorm``), ``head`` the ``classifier``, and ``norm``
    (cls pooling) the encoder's final ``beit.layernorm``."""
    if dst not in EXPORTS:
        raise ValueError(f"unknown export layout {dst!r}: expected one of {', '.join(EXPORTS)}")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if dst == "unilm":
        for name, buf in model.named_buffers():
            if name.endswith("relative_position_index"):
                sd[name] = buf.detach()
        return dict(sorted(sd.items()))
    return state_dict_to_hf(sd, v5=dst == "hf5", classifier=is_classifier(model))


def state_dict_to_hf(
    sd: dict[str, torch.Tensor], v5: bool = False, classifier: bool = False
) -> dict[str, torch.Tensor]:
    """A state dict in our names to Hugging Face names (transformers 4, or 5 with ``v5``); ``classifier``: the
    final ``norm`` is ``BeitModel``'s (``beit.layernorm``) rather than ``BeitForMaskedImageModeling``'s."""
    layer_map = {ours: hf for hf, ours in (_HF5_LAYER if v5 else _HF4_LAYER).items()}
    qkv_names = _HF5_QKV if v5 else _HF4_QKV
    prefix = "beit.layers." if v5 else "beit.encoder.layer."
    top = {ours: hf for hf, ours in _HF_TOP.items()}
    if classifier:
        top.update({"norm.weight": "beit.layernorm.weight", "norm.bias": "beit.layernorm.bias"})
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
        elif k == _OURS_SHARED:
            out[_HF5_SHARED if v5 else _HF4_SHARED] = v
        else:
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
            if m is None:
                raise ValueError(f"no Hugging Face name for parameter {k!r}")
            i, rest = m.group(1), m.group(2)
            if rest == "attn.qkv.weight":
                for name, w in zip(qkv_names, v.chunk(3)):
                    out[f"{prefix}{i}.{name}.weight"] = w
            elif rest == "attn.q_bias":
                out[f"{prefix}{i}.{qkv_names[0]}.bias"] = v
            elif rest == "attn.v_bias":
                out[f"{prefix}{i}.{qkv_names[2]}.bias"] = v
            elif rest in layer_map:
                out[f"{prefix}{i}.{layer_map[rest]}"] = v
            else:
                raise ValueError(f"no Hugging Face name for parameter {k!r}")
    return out


def hf_config_kwargs(model: nn.Module) -> dict:
    """Keyword arguments of ``transformers.BeitConfig`` for the Hugging Face model equal to ``model``:
    ``BeitForMaskedImageModeling`` for a MIM model, ``BeitForImageClassification`` for a classifier."""
    c = model.config
    if c.attn_head_dim is not None or c.qk_scale is not None or not c.qkv_bias:
        raise ValueError("Hugging Face BEiT supports only the default head dimension, scale and q/v biases")
    img = model.patch_embed.img_size
    kwargs = dict(
        image_size=img[0] if img[0] == img[1] else list(img),
        patch_size=model.patch_embed.patch_size[0],
        num_channels=c.in_chans,
        hidden_size=c.embed_dim,
        num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads,
        intermediate_size=int(c.embed_dim * c.mlp_ratio),
        hidden_act="gelu",
        use_absolute_position_embeddings=c.use_abs_pos_emb,
        use_relative_position_bias=c.use_rel_pos_bias,
        use_shared_relative_position_bias=c.use_shared_rel_pos_bias,
        layer_scale_init_value=c.init_values or 0.0,
        layer_norm_eps=c.layer_norm_eps,
        drop_path_rate=c.drop_path_rate,
    )
    if is_classifier(model):
        kwargs.update(use_mask_token=False, use_mean_pooling=c.use_mean_pooling, num_labels=model.num_classes)
    else:
        kwargs.update(vocab_size=c.vocab_size, use_mask_token=True, use_mean_pooling=True)
    return kwargs


# ----------------------------------------------------------------------------------------------------------------
# Files


def read_state_dict(path: str | os.PathLike) -> dict:
    """Read .safetensors, or .pth/.pt/.bin/.ckpt with ``torch.load(weights_only=True)``; a Hugging Face model
    folder is read through its ``model.safetensors`` or ``pytorch_model.bin``."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path} is a folder without model.safetensors or pytorch_model.bin")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    refuse_non_weights(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not a mapping)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a valid safetensors file: {e}") from e
        expected = metadata.get(SHA256_KEY)
        if expected is not None and tensors_sha256(tensors) != expected:
            raise ValueError(f"{path} is damaged: its tensors do not match the checksum written with them")
        return tensors
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} could not be read as a weights-only checkpoint ({torch_load_problem(e)}); "
            "files that need arbitrary code to unpickle are refused"
        ) from e


def peek_checkpoint(path: str | os.PathLike):
    """A checkpoint's contents with its tensors memory-mapped where the file allows it (a torch zip file), so that
    reading its entries (``args``, ``model_config``, ``kind``) leaves the weights and any optimizer state unread.
    Files that cannot be mapped (safetensors, folders, legacy formats, damaged files) are read by
    ``read_state_dict``, which also gives the refusal of a bad one."""
    p = Path(path)
    if p.is_file() and p.suffix != ".safetensors":
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # read_state_dict reads it or says why it cannot
            pass
    return read_state_dict(p)


def torch_load_problem(e: BaseException) -> str:
    """A ``torch.load`` error in one line, for our messages: what made the loader refuse the file, without torch's
    advice to re-run with ``weights_only=False`` (which runs whatever code the file names) or to allowlist the
    file's globals."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"WeightsUnpickler error:\s*([^\n]*)", text)
    if found:
        reason = re.split(r"\s+Please use `torch\.serialization", found.group(1))[0].strip()
    else:
        reason = next((line.strip() for line in text.splitlines() if line.strip()), "")
        if reason.startswith("Weights only load failed"):
            reason = "Weights only load failed"
    if re.search(r"weights.only|trust", reason, re.IGNORECASE):
        reason = "the file holds objects other than tensors and plain containers"
    return f"{type(e).__name__}: {reason}" if reason else type(e).__name__


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: the model's keys the checkpoint lacked (``missing_keys``), the checkpoint's keys
    the model has no place for (``unexpected_keys``), the keys left out on purpose (``dropped_keys``: the MIM head,
    the mask token, a shared table copied into the blocks, a head for other classes) and one line per adaptation
    (``notes``)."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    source: str = ""
    dropped_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    head_reinitialised: bool = False

    def __str__(self) -> str:
        lines = [f"loaded a {self.source} checkpoint"]
        lines += self.notes
        if self.dropped_keys:
            lines.append(f"dropped on purpose ({len(self.dropped_keys)}): {', '.join(self.dropped_keys)}")
        if self.missing_keys:
            lines.append(f"missing keys ({len(self.missing_keys)}): {', '.join(self.missing_keys)}")
        if self.unexpected_keys:
            lines.append(f"unexpected keys ({len(self.unexpected_keys)}): {', '.join(self.unexpected_keys)}")
        if not (self.missing_keys or self.unexpected_keys):
            lines.append("all other keys matched")
        return "; ".join(lines)


def checkpoint_grid(checkpoint, raw: dict) -> tuple[int, int] | None:
    """The patch grid a checkpoint was trained at, when its file says: the ``model_config`` of our checkpoints, or
    the ``config.json`` beside a Hugging Face ``model.safetensors``."""
    from beit.pretrained import grid_from_config

    if isinstance(raw, dict) and isinstance(raw.get("model_config"), dict):
        return grid_from_config(raw["model_config"])
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        config = path / "config.json" if path.is_dir() else path.parent / "config.json"
        if config.is_file():
            try:
                return grid_from_config(json.loads(config.read_text()))
            except (OSError, ValueError):
                return None
    return None


def load_pretrained(
    model: nn.Module,
    checkpoint: str | os.PathLike | dict,
    src: str = "auto",
    strict: bool = False,
    *,
    src_grid: tuple[int, int] | None = None,
    require_pos_embed: bool = False,
) -> LoadReport:
    """Load an official, timm or Hugging Face checkpoint, or one of ours (a path or a state dict) into ``model``.

    A MIM model gets the weights under its names (a shared table copied into per-block tables when it has only
    those). A classifier (``beit.create_classifier``) gets the official fine-tuning adaptation
    (``beit.pretrained.adapt_to_classifier``): the MIM head and mask token dropped, a shared table copied into
    every block, tables resized to the model's patch grid (``resize_rel_pos_table``), an absolute position
    embedding resized bicubically, and a head for another class count dropped and the model's re-initialised.
    ``src_grid`` (h, w) is the checkpoint's patch grid, needed only for a rectangular grid the file does not record;
    ``require_pos_embed`` makes a model's absolute position embedding the checkpoint lacks an error rather than a
    missing key.

    Returns a ``LoadReport``; with ``strict=True`` missing or unexpected keys raise. Architecture and shape
    mismatches always raise, before the model is changed.
    """
    raw = read_state_dict(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
    flat = unwrap_state_dict(raw)
    source = detect_source(flat) if src == "auto" else src
    if not is_classifier(model):
        converted = convert_state_dict(flat, source, model=model)
        result = model.load_state_dict(converted, strict=False)
        report = LoadReport(sorted(result.missing_keys), sorted(result.unexpected_keys), source)
    else:
        from beit.pretrained import adapt_to_classifier, reinitialise_head

        index_tokens = next((v.shape[0] for k, v in flat.items() if k.endswith("relative_position_index")), None)
        grid = tuple(src_grid) if src_grid is not None else checkpoint_grid(checkpoint, raw)
        converted, info = adapt_to_classifier(
            convert_state_dict(flat, source),
            model,
            src_grid=grid,
            index_tokens=index_tokens,
            require_pos_embed=require_pos_embed,
        )
        converted = fit_state_dict(converted, model)  # the shape check of every key left
        reinitialise_head(model, info)
        result = model.load_state_dict(converted, strict=False)
        report = LoadReport(
            sorted(result.missing_keys),
            sorted(result.unexpected_keys),
            source,
            dropped_keys=info.dropped_keys,
            notes=info.notes,
            head_reinitialised=info.head_reinitialised,
        )
    if strict and (report.missing_keys or report.unexpected_keys):
        raise ValueError(str(report))
    return report
