"""Scaling between physical units and the network's internal range.

The network sees ``(photons - input_offset) / input_scale`` and its bounded heads (sigmoid, tanh)
are multiplied by ``photons_max``, ``z_max``, ``bg_max`` and ``offset_max`` to give physical units. The values live
in the model's config, so a saved model carries its own scaling and needs nothing else at inference.
"""

from __future__ import annotations

from typing import Sequence

from pydantic import Field

from decode_accel.config_base import StrictModel
from decode_accel.errors import DecodeAccelError


def _max_abs(value: float | Sequence[float], name: str) -> float:
    """Largest |value| of a number or a (low, high) pair."""
    if isinstance(value, (int, float)):
        values = [float(value)]
    else:
        values = [float(v) for v in value]
        if len(values) != 2:
            raise DecodeAccelError(f"expected a number or a (low, high) pair, got {len(values)} values",
                                   field=name, fix="pass e.g. 750 or (-750, 750)")
    return max(abs(v) for v in values)


class Scaling(StrictModel):
    """Input normalisation and output ranges of a network (DECODE's ``autoset_scaling``).

    Defaults are DECODE's values for its reference simulation (mean intensity 10 000 photons,
    sd 3 000, z within +-750 nm, background up to 150 photons/px). Use :meth:`auto` to derive them
    from your own simulation.
    """

    input_offset: float = Field(120.0, ge=0.0,
                                description="subtracted from every input pixel before scaling; the mean background (photons)")
    input_scale: float = Field(200.0, gt=0.0,
                               description="input pixels are divided by this after the offset (photons)")
    photons_max: float = Field(34000.0, gt=0.0,
                               description="upper end of the photon head; the photon sigma is in units of it (photons)")
    z_max: float = Field(900.0, gt=0.0,
                         description="the z head spans (-z_max, z_max); the z sigma is in units of it (nm)")
    bg_max: float = Field(180.0, gt=0.0, description="upper end of the background head (photons/px)")
    offset_max: float = Field(
        1.5, gt=0.0, le=4.0,
        description="the dx, dy heads span (-offset_max, offset_max) px from the pixel centre. Above 1 so that "
                    "a detection one pixel inward can still place an emitter of the outermost pixel row or column "
                    "(trained networks fire there for emitters at the frame border; with DECODE's 1 those "
                    "positions piled up 0.5 px inside the border, 14-22 nm biased on average)")
    variance_scale: float | None = Field(
        None, gt=0.0, description="model.variance_input: the network sees log1p(read-noise variance / this); "
                                  "None = input_offset, the mean background, whose shot-noise variance it is (photons²)")

    def variance_reference(self) -> float:
        """The divisor of the read-noise variance input (photons²): ``variance_scale``, else the mean
        background ``input_offset`` (at least 1e-3)."""
        return float(self.variance_scale) if self.variance_scale is not None else max(float(self.input_offset), 1e-3)

    @classmethod
    def auto(cls, photons_mean: float, photons_sd: float, z_extent_nm: float | Sequence[float],
             bg_max: float | Sequence[float], *, bg_mean: float | None = None) -> "Scaling":
        """Scaling from the simulation's emitter and background statistics (DECODE's rules).

        Args:
            photons_mean: mean detected photons of an emitter per frame (photons), > 0.
            photons_sd: standard deviation of the photons (photons), >= 0.
            z_extent_nm: largest |z| of the emitters, or their (z_min, z_max) range (nm). 0 for 2D data.
            bg_max: largest background, or the (low, high) range of the background (photons/px).
            bg_mean: mean background (photons/px); by default the midpoint of the ``bg_max`` range,
                or ``bg_max`` itself when it is a single number (a constant background).

        Rules: input_scale = photons_mean / 50, input_offset = mean background,
        photons_max = photons_mean + 8 photons_sd, z_max = 1.2 max|z|, bg_max = 1.2 x largest background.
        With z_extent 0 (2D) z_max is set to 1 nm so that the z head stays defined; build the model with
        ``z_enabled=False`` for 2D data.
        """
        if not photons_mean > 0:
            raise DecodeAccelError(f"must be > 0, got {photons_mean}", field="photons_mean",
                                   fix="pass the mean photons per emitter and frame")
        if not photons_sd >= 0:
            raise DecodeAccelError(f"must be >= 0, got {photons_sd}", field="photons_sd")
        if isinstance(bg_max, (int, float)):
            bg_low = bg_high = float(bg_max)
        else:
            pair = [float(v) for v in bg_max]
            if len(pair) != 2 or pair[0] > pair[1]:
                raise DecodeAccelError(f"expected a number or a (low, high) pair with low <= high, got {bg_max}",
                                       field="bg_max")
            bg_low, bg_high = pair
        if bg_low < 0:
            raise DecodeAccelError(f"background cannot be negative, got {bg_max}", field="bg_max")
        if not bg_high > 0:
            raise DecodeAccelError("the largest background must be > 0", field="bg_max",
                                   fix="pass the background level in photons/px")
        mean_bg = 0.5 * (bg_low + bg_high) if bg_mean is None else float(bg_mean)
        if not 0 <= mean_bg <= bg_high:
            raise DecodeAccelError(f"must lie in [0, {bg_high}], got {bg_mean}", field="bg_mean")
        z_ext = _max_abs(z_extent_nm, "z_extent_nm")
        return cls(
            input_offset=mean_bg,
            input_scale=photons_mean / 50.0,
            photons_max=photons_mean + 8.0 * photons_sd,
            z_max=max(1.2 * z_ext, 1.0),
            bg_max=1.2 * bg_high,
        )
