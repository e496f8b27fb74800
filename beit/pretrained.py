"""From a pretraining checkpoint to a classifier: the official fine-tuning adaptation (unilm
``run_class_finetuning.py``, also in ``semantic_segmentation/mmcv_custom/checkpoint.py``), without SciPy.

``adapt_to_classifier(state_dict, classifier)`` takes a state dict in our (= the official) names, as
``beit.checkpoint.convert_state_dict`` makes it, and fits it to a ``beit.classifier.VisionTransformer``:

1. the MIM head (``lm_head.*``) and the mask token are dropped;
2. a shared relative position table (``rel_pos_bias.relative_position_bias_table``) is copied into every block
   when the classifier has per-block tables, and dropped unless it has a shared one too;
3. each relative position table whose patch grid differs from the classifier's is resampled with
   ``resize_rel_pos_table`` (the official geometric-progression coordinates and bicubic spline);
4. an absolute position embedding is resized bicubically on its patch part (cls part kept) when both have one;
5. a head whose shape differs from the classifier's is dropped and the classifier's head re-initialised
   (intermediate fine-tuning: ImageNet first, then the target data).

``beit.load_pretrained(classifier, path_or_state_dict)`` reads the file, converts the names and calls this.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

_SHARED = "rel_pos_bias.relative_position_bias_table"
_BLOCK_TABLE = re.compile(r"blocks\.(\d+)\.attn\.relative_position_bias_table")
_NUM_EXTRA = 3  # the cls rows at the end of a table: cls -> token, token -> cls, cls -> cls


# ----------------------------------------------------------------------------------------------------------------
# The relative position table resize


def _official_q(src_half: int, dst_half: int) -> float:
    """The ratio q of the source offsets, found as the official code does: bisection in (1.01, 1.5) until the
    interval is under 1e-6, keeping the last midpoint tried, for the smallest q with 1 + q + ... + q^(s-1) > t
    (s = ``src_half``, t = ``dst_half``). When no q in the interval reaches t the result is close to 1.5 (the
    outer target offsets then lie beyond the source grid and are clamped); when every q does, close to 1.01."""
    left, right = 1.01, 1.5
    q = left
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = (1.0 - q**src_half) / (1.0 - q)
        if gp > dst_half:
            right = q
        else:
            left = q
    return q


def official_source_offsets(src_side: int, dst_side: int) -> torch.Tensor:
    """The coordinates the official code gives the ``src_side`` = 2h-1 entries of one axis of a table that is
    resized to ``dst_side`` entries: 0, +-1, +-(1+q), +-(1+q+q^2), ..., ascending, float64 [src_side]."""
    s = src_side // 2
    q = _official_q(s, dst_side // 2)
    dis, cur = [], 1.0
    for i in range(s):
        dis.append(cur)
        cur += q ** (i + 1)
    return torch.tensor([-d for d in reversed(dis)] + [0.0] + dis, dtype=torch.float64)


def _bspline_basis(knots: torch.Tensor, k: int, xs: torch.Tensor) -> torch.Tensor:
    """The values [len(xs), n] of the n = len(knots) - k - 1 B-splines of degree k on ``knots`` at ``xs`` (inside
    [knots[k], knots[n]]; the right end belongs to the last interval), by the Cox-de Boor recursion."""
    n = knots.numel() - k - 1
    # The knot interval of each point: knots[l] <= x < knots[l+1], k <= l <= n-1.
    span = torch.searchsorted(knots, xs, right=True) - 1
    span = span.clamp(k, n - 1)
    nb = torch.zeros(xs.numel(), k + 1, dtype=torch.float64)
    nb[:, 0] = 1.0
    left = torch.zeros(xs.numel(), k + 1, dtype=torch.float64)
    right = torch.zeros(xs.numel(), k + 1, dtype=torch.float64)
    for j in range(1, k + 1):
        left[:, j] = xs - knots[span + 1 - j]
        right[:, j] = knots[span + j] - xs
        saved = torch.zeros(xs.numel(), dtype=torch.float64)
        for r in range(j):
            temp = nb[:, r] / (right[:, r + 1] + left[:, j - r])
            nb[:, r] = saved + right[:, r + 1] * temp
            saved = left[:, j - r] * temp
        nb[:, j] = saved
    out = torch.zeros(xs.numel(), n, dtype=torch.float64)
    cols = span[:, None] - k + torch.arange(k + 1)[None, :]  # basis functions span-k .. span
    out.scatter_(1, cols, nb)
    return out


def cubic_spline_matrix(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """W [len(targets), m] with W @ z = s(targets) for the interpolating cubic spline s through (x_i, z_i).

    The spline is FITPACK's for s = 0 (``RectBivariateSpline``/``interp2d`` along one axis): knots x_0 (four
    times), x_2, ..., x_{m-3}, x_{m-1} (four times), i.e. the not-a-knot conditions at both ends. Targets outside
    [x_0, x_{m-1}] are clamped to it, as FITPACK's evaluation does. ``x`` ascending, m >= 4; float64."""
    x = x.to(torch.float64)
    m = x.numel()
    if m < 4:
        raise ValueError(f"a cubic spline needs at least 4 points on an axis, got {m}")
    knots = torch.cat([x[:1].repeat(4), x[2 : m - 2], x[-1:].repeat(4)])
    collocation = _bspline_basis(knots, 3, x)  # [m, m]
    at = _bspline_basis(knots, 3, targets.to(torch.float64).clamp(x[0].item(), x[-1].item()))  # [n, m]
    # W = at @ collocation^-1, as a solve: collocation^T W^T = at^T.
    return torch.linalg.solve(collocation.T, at.T).T


def _axis_matrix(src: int, dst: int) -> torch.Tensor:
    """The [2*dst-1, 2*src-1] resampling of one axis of a table from ``src`` to ``dst`` patches."""
    src_side, dst_side = 2 * src - 1, 2 * dst - 1
    if src == dst:
        return torch.eye(src_side, dtype=torch.float64)
    if src_side < 4:
        raise ValueError(
            f"cannot resize a relative position table from {src} patches a side: the official bicubic scheme "
            "needs at least 3 patches a side in the checkpoint"
        )
    t = dst_side // 2
    targets = torch.arange(-t, t + 1, dtype=torch.float64)
    return cubic_spline_matrix(official_source_offsets(src_side, dst_side), targets)


def _grid(g, name: str) -> tuple[int, int]:
    if isinstance(g, int):
        g = (g, g)
    if not (isinstance(g, (tuple, list)) and len(g) == 2 and all(isinstance(v, int) and v > 0 for v in g)):
        raise ValueError(f"{name} must be a pair of positive ints (patches along height and width), got {g!r}")
    return int(g[0]), int(g[1])


def table_rows(grid: tuple[int, int]) -> int:
    """Rows of a relative position table for a patch grid (h, w): (2h-1)(2w-1) offsets and 3 cls entries."""
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + _NUM_EXTRA


def resize_rel_pos_table(table: torch.Tensor, src_grid, dst_grid) -> torch.Tensor:
    """Resample a relative position bias table [L, H] from a (h, w) patch grid to (H', W'), as the official
    fine-tuning code does (``run_class_finetuning.py``); returns [L', H] in the table's dtype and device.

    L = (2h-1)(2w-1) + 3. The last 3 rows (the cls entries) are kept. The rest is, per head, a grid G of
    (2h-1) x (2w-1) values (rows: the height offset, columns: the width offset, as the index lays them out), whose
    source coordinates along an axis of s = 2h-1 entries are the official non-uniform ones: 0, +-1, +-(1+q),
    +-(1+q+q^2), ... with q from ``_official_q`` (the offsets grow geometrically, so the near offsets keep their
    values and the far ones stretch to cover the new range). The target coordinates are the integer offsets
    -t..t, t = H'-1. A bicubic interpolating spline through G (FITPACK's, as ``scipy.interpolate.interp2d(kind=
    'cubic')`` built it) is evaluated there; it is separable, so per head

        G' = Wy @ G @ Wx^T        Wy [2H'-1, 2h-1], Wx [2W'-1, 2w-1] from ``cubic_spline_matrix``

    Targets beyond the outermost source offset (when q would have to exceed 1.5) take the boundary value. An axis
    whose size does not change is kept as it is (the official code, square grids only, never meets this case).
    Computed in float64. Needs at least 3 patches a side in the source along a resized axis."""
    src_grid, dst_grid = _grid(src_grid, "src_grid"), _grid(dst_grid, "dst_grid")
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"a relative position table must be a 2-D tensor [L, heads], got {got}")
    if table.shape[0] != table_rows(src_grid):
        raise ValueError(
            f"the table has {table.shape[0]} rows but a {src_grid[0]}x{src_grid[1]} patch grid needs "
            f"{table_rows(src_grid)} ((2h-1)(2w-1)+3)"
        )
    if src_grid == dst_grid:
        return table
    wy = _axis_matrix(src_grid[0], dst_grid[0])
    wx = _axis_matrix(src_grid[1], dst_grid[1])
    heads = table.shape[1]
    grid = table[:-_NUM_EXTRA].detach().to("cpu", torch.float64).T.reshape(heads, 2 * src_grid[0] - 1, -1)
    resized = wy @ grid @ wx.T  # [H, 2H'-1, 2W'-1]
    resized = resized.reshape(heads, -1).T.to(table.device, table.dtype)
    return torch.cat([resized, table[-_NUM_EXTRA:].detach()], dim=0)


def resize_pos_embed(pos_embed: torch.Tensor, src_grid, dst_grid) -> torch.Tensor:
    """An absolute position embedding [1, 1 + h*w, D] resized to [1, 1 + H'*W', D]: the patch part bicubically
    (``F.interpolate(mode='bicubic', align_corners=False)``, as the official code), the cls part kept."""
    src_grid, dst_grid = _grid(src_grid, "src_grid"), _grid(dst_grid, "dst_grid")
    n = src_grid[0] * src_grid[1]
    if pos_embed.dim() != 3 or pos_embed.shape[1] != n + 1:
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not fit a {src_grid[0]}x{src_grid[1]} patch grid "
            f"(expected [1, {n + 1}, D])"
        )
    if src_grid == dst_grid:
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    d = pos_embed.shape[-1]
    patches = patches.detach().float().reshape(-1, *src_grid, d).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=dst_grid, mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([cls.detach(), patches], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Grids of a checkpoint


def grid_from_table(rows: int, num_tokens: int | None = None) -> tuple[int, int] | None:
    """The patch grid (h, w) of a table with ``rows`` rows: from the token count N+1 of its index when known
    (h*w = N and (2h-1)(2w-1) = rows-3 give h+w and hw), else square when rows-3 is an odd square. None when
    neither settles it."""
    if num_tokens is not None:
        n = num_tokens - 1
        s2 = 4 * n + 1 - (rows - _NUM_EXTRA)  # = 2(h+w)
        if s2 > 0 and s2 % 2 == 0:
            s = s2 // 2
            disc = s * s - 4 * n
            r = math.isqrt(max(disc, 0))
            if disc >= 0 and r * r == disc and (s + r) % 2 == 0:
                h, w = (s + r) // 2, (s - r) // 2
                if w > 0 and table_rows((h, w)) == rows:
                    return (h, w) if h == w else None  # (h, w) and (w, h) fit alike: only a square is certain
    side = math.isqrt(rows - _NUM_EXTRA) if rows > _NUM_EXTRA else 0
    if side * side == rows - _NUM_EXTRA and side % 2 == 1:
        return (side + 1) // 2, (side + 1) // 2
    return None


def grid_from_config(config: dict | None) -> tuple[int, int] | None:
    """The patch grid of a model configuration (ours: ``img_size``/``patch_size``; Hugging Face: ``image_size``/
    ``patch_size``), or None."""
    if not isinstance(config, dict):
        return None
    img = config.get("img_size", config.get("image_size"))
    patch = config.get("patch_size")
    if img is None or patch is None:
        return None
    img = (img, img) if isinstance(img, int) else tuple(img)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if len(img) != 2 or len(patch) != 2 or any(i % p for i, p in zip(img, patch)):
        return None
    return img[0] // patch[0], img[1] // patch[1]


# ----------------------------------------------------------------------------------------------------------------
# The adaptation


@dataclass
class Adaptation:
    """What ``adapt_to_classifier`` did: the keys it dropped on purpose and one line per change."""

    dropped_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    head_reinitialised: bool = False


def check_architecture(sd: dict[str, torch.Tensor], model) -> None:
    """Refuse a checkpoint (our names) whose width, depth, patch size, input channels or head count differ from
    the model's, naming each, before anything is loaded."""
    problems = []
    proj = sd.get("patch_embed.proj.weight")
    mine = model.patch_embed.proj.weight
    if proj is not None:
        if proj.shape[0] != mine.shape[0]:
            problems.append(f"width (embed_dim): checkpoint {proj.shape[0]}, model {mine.shape[0]}")
        if tuple(proj.shape[2:]) != tuple(mine.shape[2:]):
            problems.append(
                f"patch size: checkpoint {'x'.join(map(str, proj.shape[2:]))}, "
                f"model {'x'.join(map(str, mine.shape[2:]))}"
            )
        if proj.shape[1] != mine.shape[1]:
            problems.append(f"input channels: checkpoint {proj.shape[1]}, model {mine.shape[1]}")
    elif "cls_token" in sd and sd["cls_token"].shape[-1] != model.cls_token.shape[-1]:
        problems.append(f"width (embed_dim): checkpoint {sd['cls_token'].shape[-1]}, model {model.cls_token.shape[-1]}")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks and max(blocks) + 1 != len(model.blocks):
        problems.append(f"depth: checkpoint {max(blocks) + 1} blocks, model {len(model.blocks)}")
    heads = model.blocks[0].attn.num_heads if len(model.blocks) else None
    for k, v in sd.items():
        if k.endswith("relative_position_bias_table") and v.dim() == 2 and heads is not None and v.shape[1] != heads:
            problems.append(f"heads: checkpoint {v.shape[1]} ({k}), model {heads}")
            break
    if problems:
        raise ValueError("the checkpoint's architecture does not match the model: " + "; ".join(problems))


def adapt_to_classifier(
    sd: dict[str, torch.Tensor],
    model,
    *,
    src_grid: tuple[int, int] | None = None,
    index_tokens: int | None = None,
    require_pos_embed: bool = False,
) -> tuple[dict[str, torch.Tensor], Adaptation]:
    """Fit a state dict in our names to the classifier ``model`` (see the module docstring); the model's head is
    re-initialised when the checkpoint's is dropped. ``src_grid`` is the checkpoint's patch grid (h, w) when known
    (its configuration); otherwise it is read from the tables (``grid_from_table``, with ``index_tokens``, the
    N+1 of a ``relative_position_index`` the file held) or from a square position embedding.

    Raises ``ValueError`` before any change to the model: on an architecture mismatch (``check_architecture``),
    on a table or position embedding whose source grid cannot be told, and, with ``require_pos_embed``, when the
    model has an absolute position embedding the checkpoint lacks."""
    check_architecture(sd, model)
    sd = dict(sd)
    info = Adaptation()
    target = model.state_dict()
    dst_grid = tuple(model.patch_embed.patch_shape)

    # 1. The pretraining-only parameters.
    for k in sorted(sd):
        if (k.startswith("lm_head.") or k == "mask_token") and k not in target:
            del sd[k]
            info.dropped_keys.append(k)

    # 2. A shared table into every block.
    block_tables = sorted((k for k in target if _BLOCK_TABLE.fullmatch(k)), key=lambda k: int(k.split(".")[1]))
    if _SHARED in sd and block_tables and not any(k in sd for k in block_tables):
        shared = sd[_SHARED] if _SHARED in target else sd.pop(_SHARED)
        for k in block_tables:
            sd[k] = shared.clone()
        info.notes.append(f"copied the shared relative position table into the {len(block_tables)} blocks' tables")
        if _SHARED not in target:
            info.dropped_keys.append(_SHARED)

    # 3. Tables for another grid.
    resized_tables = []
    for k in sorted(sd):
        if not k.endswith("relative_position_bias_table") or k not in target:
            continue
        rows = sd[k].shape[0]
        grid = src_grid
        if grid is not None and table_rows(grid) != rows:
            raise ValueError(
                f"{k} has {rows} rows, which does not fit the checkpoint's {grid[0]}x{grid[1]} patch grid "
                f"({table_rows(grid)} rows)"
            )
        if grid is None:
            if rows == target[k].shape[0]:
                continue  # the model's own grid, as far as can be told
            grid = grid_from_table(rows, index_tokens)
            if grid is None:
                raise ValueError(
                    f"cannot tell the patch grid of {k} ({rows} rows, not a square grid's): "
                    "pass src_grid=(h, w), the checkpoint's patches along height and width"
                )
        if grid != dst_grid:
            sd[k] = resize_rel_pos_table(sd[k], grid, dst_grid)
            resized_tables.append(k)
            src_desc = f"{grid[0]}x{grid[1]}"
    if resized_tables:
        info.notes.append(
            f"resized {len(resized_tables)} relative position table(s) from a {src_desc} to a "
            f"{dst_grid[0]}x{dst_grid[1]} patch grid (the official geometric-progression bicubic scheme)"
        )

    # 4. The absolute position embedding.
    if "pos_embed" in target:
        if "pos_embed" not in sd:
            if require_pos_embed:
                raise ValueError(
                    "the model has an absolute position embedding (use_abs_pos_emb=True) but the checkpoint has "
                    "none to resize (it was pretrained with relative position bias only): build the classifier "
                    "with use_abs_pos_emb=False, or load a checkpoint that has pos_embed"
                )
        else:
            n = sd["pos_embed"].shape[1] - 1
            grid = src_grid
            if grid is None or grid[0] * grid[1] != n:
                side = math.isqrt(n)
                if side * side != n:
                    raise ValueError(
                        f"cannot tell the patch grid of pos_embed ({n} patches, not a square): pass src_grid=(h, w)"
                    )
                grid = (side, side)
            if grid != dst_grid:
                sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], grid, dst_grid)
                info.notes.append(
                    f"resized pos_embed bicubically from a {grid[0]}x{grid[1]} to a {dst_grid[0]}x{dst_grid[1]} grid"
                )

    # 5. A head for other classes.
    head_keys = [k for k in ("head.weight", "head.bias") if k in sd]
    if head_keys and any(k not in target or tuple(sd[k].shape) != tuple(target[k].shape) for k in head_keys):
        old = sd["head.weight"].shape[0] if "head.weight" in sd else "?"
        for k in head_keys:
            del sd[k]
            info.dropped_keys.append(k)
        info.head_reinitialised = True
        info.notes.append(f"dropped the checkpoint's head ({old} classes) for the model's ({model.num_classes})")
    return sd, info


def reinitialise_head(model, info: Adaptation) -> None:
    """Give the model a fresh head when the checkpoint's was dropped (after the checks, before the load)."""
    if info.head_reinitialised:
        model.reset_classifier(model.num_classes)
        info.notes[-1] += ", re-initialised"
