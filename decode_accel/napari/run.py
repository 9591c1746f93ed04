"""What the widget runs in its worker thread, without Qt: predict a movie in chunks, one frame's maps.

:func:`predict_chunks` calls the library's :func:`decode_accel.inference.predict.predict` once per chunk of
frames and yields after each, so a napari worker can report progress and stop between chunks. A frame
range given to ``predict`` uses the movie's true neighbour frames, so the concatenated table is the
table one ``predict`` call (``decode-accel predict``) gives on the same movie; the price is that each
chunk encodes its two boundary frames once more (about 2 / chunk of the stage-1 compute).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd

from decode_accel.errors import DecodeAccelError
from decode_accel.export import load_exported
from decode_accel.inference.movie import open_movie, parse_frames
from decode_accel.inference.predict import DEFAULT_TILE_SIZE, predict
from decode_accel.table import empty_table

__all__ = ["Progress", "load_model", "predict_chunks", "probability_map", "chunk_size"]

#: pixels (frames x H x W) per chunk: about a second of CPU work for a small network
CHUNK_PX = 2 ** 20
MIN_CHUNK_FRAMES, MAX_CHUNK_FRAMES = 16, 1000


@dataclass
class Progress:
    """What the worker yields: frames done of total, and (once) the model it loaded."""

    done: int
    total: int
    model: Any = field(default=None, repr=False)


def load_model(model):
    """An ``ExportedModel`` from an export folder or Hub id (HF_HUB_OFFLINE=1 reads the local cache);
    an ``ExportedModel``-like object is returned as it is."""
    if model is None or (isinstance(model, str) and not model.strip()):
        raise DecodeAccelError("no model given", field="model", fix="choose an export folder or type a Hub id")
    if hasattr(model, "model") and hasattr(model, "px_size_nm"):
        return model
    return load_exported(str(model).strip())


def chunk_size(height: int, width: int, n_channels: int = 1) -> int:
    """Frames per predict call for a movie of this frame size."""
    return int(np.clip(CHUNK_PX // max(1, height * width * n_channels), MIN_CHUNK_FRAMES, MAX_CHUNK_FRAMES))


def _merge(tables: list[pd.DataFrame]) -> pd.DataFrame:
    df = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    if "id" in df.columns and df["id"].duplicated().any():
        df["id"] = np.arange(len(df), dtype=np.int64)  # as predict() numbers rows whose ids restart per batch
    df.attrs.update(tables[-1].attrs)
    return df


def predict_chunks(model, inputs, *, threshold: float | None = None, frames=None,
                   tile_size: int | None = DEFAULT_TILE_SIZE, camera=None, check_px_size: bool = True,
                   chunk_frames: int | None = None, device=None) -> Iterator[Progress]:
    """Localize ``inputs`` (a movie path, one path per channel, a Movie or an ADU array) chunk by chunk.

    Yields :class:`Progress` first with the loaded model (``done == 0``), then after every chunk; returns
    (``StopIteration.value``) the table with ``attrs`` px_size_nm, width, height, n_frames, as predict's.
    ``threshold`` None is the model's own operating threshold; ``frames`` a 0-based ``(A, B)``/``"A:B"``.
    """
    exported = load_model(model)
    movie = open_movie(inputs)
    sel = parse_frames(frames, movie.n_frames)
    total = sel.stop - sel.start
    yield Progress(0, total, model=exported)
    step = chunk_frames or chunk_size(movie.height, movie.width, movie.n_channels)
    tables = []
    for a in range(sel.start, sel.stop, step):
        b = min(a + step, sel.stop)
        tables.append(predict(exported, movie, frames=(a, b), threshold=threshold, tile_size=tile_size,
                              camera=camera, check_px_size=check_px_size, progress=False, device=device))
        yield Progress(b - sel.start, total)
    return _merge(tables)


def probability_map(model, inputs, frame: int, *, tile_size: int | None = DEFAULT_TILE_SIZE, camera=None,
                    check_px_size: bool = True, device=None) -> np.ndarray:
    """The network's detection probability map ``(H, W)`` (or ``(C, H, W)``) of one 0-based frame.

    Runs predict on that frame with a post-processor that keeps the output maps (the same maps the
    table of that frame is made from).
    """

    kept = {}

    def keep_maps(output, frame_offset=0, **_):
        kept["p"] = output["p"][0].detach().float().cpu().numpy()
        return empty_table()

    exported = load_model(model)
    predict(exported, inputs, frames=(int(frame), int(frame) + 1), tile_size=tile_size, camera=camera,
            check_px_size=check_px_size, progress=False, device=device, postprocessor=keep_maps)
    return kept["p"]
