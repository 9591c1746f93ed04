"""Tiled inference for frames of any size, identical to whole-frame inference.

A fully convolutional network's output at a pixel depends only on the input inside its receptive
field, and a network with total stride ``s`` (``2**depth`` for a U-Net) is translation-equivariant
for shifts that are multiples of ``s``. So a frame can be cut into overlapping tiles whose origins
lie on the stride grid, each tile run separately, and each output pixel taken from a tile in which
it lies at least one receptive-field radius from every *cut* edge. The result equals whole-frame
inference up to float rounding.

The frame is first padded at its bottom/right border (edge replication) to a "canvas" whose
height and width are multiples of ``s``; tiles that touch a canvas border see exactly the border
the whole-canvas network sees. Nothing is cropped: every input pixel gets an output.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from decode_accel.errors import DecodeAccelError

__all__ = ["Tile", "TilePlan", "plan_tiles", "size_multiple", "receptive_field_radius", "pad_to_canvas",
           "Stitcher", "predict_maps_tiled"]


@dataclass(frozen=True)
class Tile:
    """One tile: input region ``[y0, y0 + h) x [x0, x0 + w)`` of the canvas (px), and the region
    ``[ky0, ky1) x [kx0, kx1)`` (canvas px) whose outputs are kept from it."""

    y0: int
    x0: int
    h: int
    w: int
    ky0: int
    ky1: int
    kx0: int
    kx1: int


@dataclass(frozen=True)
class TilePlan:
    """Tiles covering a ``height x width`` frame padded to a ``canvas_h x canvas_w`` canvas."""

    height: int
    width: int
    canvas_h: int
    canvas_w: int
    tiles: tuple[Tile, ...]


def _plan_1d(length: int, tile: int, margin: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(origin, size, keep_start, keep_stop) along one axis of a canvas of ``length`` px."""
    if length <= tile:
        return [(0, length, 0, length)]
    step = (tile - 2 * margin) // stride * stride
    if step <= 0:
        raise DecodeAccelError(
            f"tile size {tile} px is too small for the network's receptive-field margin {margin} px",
            field="tile_size", fix=f"use a tile size of at least {2 * margin + stride} px (multiple of {stride})")
    origins = [0]
    while origins[-1] + tile < length:
        origins.append(min(origins[-1] + step, length - tile))
    cuts = [origins[i + 1] + (origins[i] + tile - origins[i + 1]) // 2 for i in range(len(origins) - 1)]
    bounds = [0] + cuts + [length]
    return [(o, tile, bounds[i], bounds[i + 1]) for i, o in enumerate(origins)]


def plan_tiles(height: int, width: int, *, tile_size: int | None, margin: int, stride: int) -> TilePlan:
    """Plan tiles for a ``height x width`` frame (px).

    ``tile_size``: tile edge (px, rounded down to a multiple of ``stride``); None = one tile.
    ``margin``: the receptive-field radius (px): kept outputs lie at least this far from a cut.
    ``stride``: the network's size multiple (``2**depth``); tile origins are multiples of it.
    """
    if height < 1 or width < 1:
        raise DecodeAccelError(f"frame size {height}x{width} px is empty", field="frame size", fix="check the movie")
    canvas_h = math.ceil(height / stride) * stride
    canvas_w = math.ceil(width / stride) * stride
    if tile_size is None:
        tile = max(canvas_h, canvas_w)
    else:
        tile = int(tile_size) // stride * stride
        if tile < stride:
            raise DecodeAccelError(f"tile size {tile_size} px is smaller than the network stride {stride} px",
                                   field="tile_size", fix=f"use a multiple of {stride}")
    rows, cols = _plan_1d(canvas_h, tile, margin, stride), _plan_1d(canvas_w, tile, margin, stride)
    tiles = tuple(Tile(y0, x0, h, w, ky0, ky1, kx0, kx1)
                  for (y0, h, ky0, ky1) in rows for (x0, w, kx0, kx1) in cols)
    return TilePlan(height, width, canvas_h, canvas_w, tiles)


def size_multiple(model: torch.nn.Module) -> int:
    """The network's input size multiple (``2**depth``): H and W of its input must be multiples.

    Read from the model (``size_multiple``, ``stride``, ``depth``, or ``config.depth``).
    """
    for name in ("size_multiple", "stride"):
        v = getattr(model, name, None)
        if isinstance(v, int) and v > 0:
            return v
    for holder in (model, getattr(model, "config", None)):
        d = getattr(holder, "depth", None) if holder is not None else None
        if d is None and isinstance(holder, dict):
            d = holder.get("depth")
        if isinstance(d, int) and d >= 0:
            return 2 ** d
    # A DoubleMUNet-style model may keep depth per stage: take the deepest.
    depths = [getattr(m, "depth") for m in model.modules() if isinstance(getattr(m, "depth", None), int)]
    if depths:
        return 2 ** max(depths)
    raise DecodeAccelError("cannot tell the network's size multiple (2**depth)", field="model",
                           fix="give the model a 'depth' or 'size_multiple' attribute")


def _output_maps(out: dict) -> list[torch.Tensor]:
    return [v for v in out.values() if isinstance(v, torch.Tensor) and v.dim() >= 3]


_RADIUS_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def receptive_field_radius(model: torch.nn.Module, n_channels: int, *, stride: int | None = None,
                           start_canvas: int = 128, max_canvas: int = 512) -> int | None:
    """Measure the receptive-field radius (px) of ``model`` on 3-frame windows.

    The gradient of every output map at a ``stride x stride`` block in the centre of a random
    photon canvas, taken in float64, is non-zero exactly at the inputs that can influence those
    outputs; the radius is the largest distance from the block to such an input. The canvas grows
    until the non-zero region stops short of its border. Returns None when the field reaches every
    canvas up to ``max_canvas`` (a global operation such as instance normalization): such a model
    cannot be tiled exactly. A ``model.receptive_field_radius`` attribute, when present, is used as is.
    """
    given = getattr(model, "receptive_field_radius", None)
    if isinstance(given, int):
        return given
    stride = stride or size_multiple(model)
    key = (n_channels, stride, start_canvas, max_canvas)
    known = _RADIUS_CACHE.get(model, {})
    if key not in known:  # the field depends on the architecture only: measure once per model
        known[key] = _measure_radius(model, n_channels, stride, start_canvas, max_canvas)
        _RADIUS_CACHE[model] = known
    return known[key]


def _measure_radius(model, n_channels, stride, start_canvas, max_canvas):
    # a network with the sCMOS variance input reads more channels than the camera has (input_channels)
    n_channels = getattr(model, "input_channels", None) or n_channels
    probe = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    gen = torch.Generator().manual_seed(0)
    size = max(start_canvas // stride * stride, 4 * stride)
    while size <= max_canvas:
        x = (torch.rand(1, n_channels, 3, size, size, generator=gen, dtype=torch.float64) * 100 + 10)
        x.requires_grad_(True)
        c0 = size // 2 // stride * stride
        with torch.enable_grad():  # callers usually run under no_grad
            out = probe(x)
            total = sum(m[..., c0:c0 + stride, c0:c0 + stride].sum() for m in _output_maps(out))
            (grad,) = torch.autograd.grad(total, x)
        hit = grad.abs().sum(dim=(0, 1, 2)) > 0
        rows = torch.nonzero(hit.any(dim=1)).flatten()
        cols = torch.nonzero(hit.any(dim=0)).flatten()
        touches = rows.min() == 0 or cols.min() == 0 or rows.max() == size - 1 or cols.max() == size - 1
        if not touches:
            # The non-zero region is the union over the block's pixels, so measure each side from
            # the block's far edge: an upper bound for every pixel whatever its phase on the stride grid.
            lo = (c0 + stride - 1) - min(int(rows.min()), int(cols.min()))
            hi = max(int(rows.max()), int(cols.max())) - c0
            return max(lo, hi)
        size *= 2
    return None


def pad_to_canvas(frames: torch.Tensor, canvas_h: int, canvas_w: int) -> torch.Tensor:
    """Pad ``(..., H, W)`` frames at the bottom/right to ``canvas_h x canvas_w`` by edge replication.

    Replication (not zeros) keeps the padded strip looking like camera data to the network.
    """
    h, w = frames.shape[-2:]
    if (h, w) == (canvas_h, canvas_w):
        return frames
    lead = frames.shape[:-2]
    flat = frames.reshape(-1, 1, h, w)
    padded = F.pad(flat, (0, canvas_w - w, 0, canvas_h - h), mode="replicate")
    return padded.reshape(*lead, canvas_h, canvas_w)


class Stitcher:
    """Collects the kept centre region of each tile's output maps into whole-frame maps."""

    def __init__(self, plan: TilePlan):
        self.plan = plan
        self.maps: dict[str, torch.Tensor] = {}

    def paste(self, tile: Tile, out: dict) -> None:
        """Copy the kept region of ``out`` (maps shaped ``(n, [C,] tile.h, tile.w)``) into place."""
        ys, xs = slice(tile.ky0 - tile.y0, tile.ky1 - tile.y0), slice(tile.kx0 - tile.x0, tile.kx1 - tile.x0)
        for key, v in out.items():
            if not isinstance(v, torch.Tensor) or v.dim() < 3 or tuple(v.shape[-2:]) != (tile.h, tile.w):
                continue
            if key not in self.maps:
                shape = (*v.shape[:-2], self.plan.canvas_h, self.plan.canvas_w)
                self.maps[key] = torch.empty(shape, dtype=torch.float32, device=v.device)
            self.maps[key][..., tile.ky0:tile.ky1, tile.kx0:tile.kx1] = v[..., ys, xs].float()

    def result(self) -> dict[str, torch.Tensor]:
        """The stitched maps cropped to the frame (``(n, [C,] height, width)``)."""
        h, w = self.plan.height, self.plan.width
        return {k: v[..., :h, :w] for k, v in self.maps.items()}


def predict_maps_tiled(model: torch.nn.Module, windows: torch.Tensor, *, tile_size: int | None,
                       margin: int | None = None, stride: int | None = None) -> dict[str, torch.Tensor]:
    """Run ``model`` on 3-frame windows ``(B, C, 3, H, W)`` (photons) of any H, W, tile by tile.

    Returns the output maps at ``(B, [C,] H, W)``. ``margin`` defaults to the measured receptive
    field radius; tiling is skipped (one tile) when the receptive field is unbounded.
    """
    stride = stride or size_multiple(model)
    if margin is None:
        margin = receptive_field_radius(model, windows.shape[1], stride=stride)
        if margin is None:
            warnings.warn("the model's receptive field covers the whole frame: running untiled", stacklevel=2)
            tile_size = None
            margin = 0
    h, w = windows.shape[-2:]
    plan = plan_tiles(h, w, tile_size=tile_size, margin=margin, stride=stride)
    canvas = pad_to_canvas(windows, plan.canvas_h, plan.canvas_w)
    stitch = Stitcher(plan)
    for t in plan.tiles:
        stitch.paste(t, model(canvas[..., t.y0:t.y0 + t.h, t.x0:t.x0 + t.w]))
    return stitch.result()
