"""Config sections of the simulator: frame, emitters, PSF, background, camera, channels.

Every section is a :class:`~decode_accel.config_base.StrictModel` (unknown keys rejected); every field
states its unit. :class:`SimulationConfig` composes them and is what :class:`Simulator` takes.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from decode_accel.config_base import StrictModel

#: Camera presets: name -> field values. Values given explicitly next to ``preset`` win.
CAMERA_PRESETS: dict[str, dict[str, Any]] = {
    # SMLM Challenge 2016 (Sage et al. 2019), as used by DECODE's challenge configs.
    "challenge2016": dict(kind="emccd", qe=0.9, spurious_charge=0.002, em_gain=300.0, read_noise=74.4,
                          e_per_adu=45.0, baseline=100.0),
}


def _check_range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if lo > hi:
        raise ValueError(f"{name} min {lo} > max {hi}; give (min, max)")
    return value


class FrameConfig(StrictModel):
    """Size and pixel size of the simulated camera frames."""

    height: int = Field(40, ge=1, description="frame height (px, rows)")
    width: int = Field(40, ge=1, description="frame width (px, columns)")
    px_size: float = Field(100.0, gt=0, description="pixel size in the sample plane (nm)")


class EmitterConfig(StrictModel):
    """Blinking emitters: how many, how bright, where in z, how long they stay on.

    Give the density either per µm² (``density``) or per frame (``emitters_per_frame``), not both;
    with neither, the density is ``DEFAULT_DENSITY`` = 1.0 /µm² (both fields stay None, so a later
    override of either one is not a conflict). Either way it is the MEAN NUMBER OF VISIBLE EMITTERS
    PER FRAME (an emitter is visible in a frame when it is on during any part of it).
    """

    DEFAULT_DENSITY: ClassVar[float] = 1.0

    density: float | None = Field(
        None, ge=0, description="mean visible emitters per frame per µm²; None with emitters_per_frame None = 1.0 (1/µm²)")
    emitters_per_frame: float | None = Field(None, ge=0, description="mean visible emitters per frame (count)")
    photons_mean: float = Field(5000.0, gt=0, description="mean photons of a molecule on for a full frame (photons)")
    photons_sd: float = Field(1500.0, ge=0, description="standard deviation of those photons (photons)")
    photons_distribution: Literal["normal", "lognormal"] = Field(
        "normal", description="'normal' (clamped positive, as DECODE) or 'lognormal' with that mean and sd (-)")
    z_range: tuple[float, float] = Field((-500.0, 500.0), description="z drawn uniformly in [min, max] (nm)")
    on_time_mean: float = Field(1.0, gt=0, description="mean on-time of a blink, exponential (frames)")
    label_min_photons: float = Field(
        100.0, ge=0, description="emitter-frames with fewer photons are rendered but left out of training labels (photons)")

    @model_validator(mode="after")
    def _one_density(self) -> "EmitterConfig":
        if self.density is not None and self.emitters_per_frame is not None:
            raise ValueError("give either density (1/µm²) or emitters_per_frame, not both; set the other to null")
        return self

    @field_validator("z_range")
    @classmethod
    def _z_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _check_range("z_range", v)

    def mean_visible(self, frame: FrameConfig) -> float:
        """Mean number of visible emitters per frame for this frame size (count)."""
        if self.emitters_per_frame is not None:
            return float(self.emitters_per_frame)
        density = self.DEFAULT_DENSITY if self.density is None else self.density
        area_um2 = frame.height * frame.width * (frame.px_size / 1000.0) ** 2
        return float(density) * area_um2


class PSFConfig(StrictModel):
    """Point-spread function.

    * ``gaussian``: pixel-integrated 2D Gaussian of width ``sigma`` (no z dependence).
    * ``astigmatic``: Huang et al. 2008 width model, per image axis (x = columns, y = rows):
      σ_x(z) = σ0_x·sqrt(1 + u² + A_x·u³ + B_x·u⁴) with u = (z − focal_x)/depth_x, σ_y the same with
      the y parameters. ``focal_x`` is the z (nm) where σ_x is narrowest: the focal plane of x as
      ThunderSTORM's calibration reports it (its c1; d1 = depth_x, w01 = sigma0_x). Per-axis fields
      left unset come from the shorthand ``sigma0, gamma, depth, A, B``: focal_x = −gamma,
      focal_y = +gamma. DECODE's ``foc_shift`` is NOT this gamma: DECODE's x is the image row, so its
      PSF has x (columns) narrowest at z = +foc_shift; import DECODE/SMAP or ThunderSTORM values with
      ``decode_accel.calibration.astigmatism`` instead of copying numbers.
    * ``spline``: cubic-spline PSF from a SMAP ``*_3dcal.mat`` calibration (``spline_path``).
    """

    kind: Literal["gaussian", "astigmatic", "spline"] = Field("gaussian", description="PSF model (-)")
    sigma: float = Field(1.0, gt=0, description="Gaussian PSF standard deviation (px)")
    sigma0: float = Field(1.0, gt=0, description="astigmatic in-focus standard deviation, both axes unless sigma0_x/y (px)")
    gamma: float = Field(250.0, description="astigmatic shorthand: focal_x = -gamma, focal_y = +gamma (nm)")
    depth: float = Field(280.0, gt=0, description="astigmatic focus depth d of the Huang model, both axes unless depth_x/y (nm)")
    A: float = Field(0.0, description="astigmatic cubic coefficient, both axes unless A_x/A_y (-)")
    B: float = Field(0.0, description="astigmatic quartic coefficient, both axes unless B_x/B_y (-)")
    focal_x: float | None = Field(None, description="z where the width along x (columns) is smallest; None = -gamma (nm)")
    focal_y: float | None = Field(None, description="z where the width along y (rows) is smallest; None = +gamma (nm)")
    depth_x: float | None = Field(None, gt=0, description="focus depth of the x width; None = depth (nm)")
    depth_y: float | None = Field(None, gt=0, description="focus depth of the y width; None = depth (nm)")
    sigma0_x: float | None = Field(None, gt=0, description="smallest width along x (columns); None = sigma0 (px)")
    sigma0_y: float | None = Field(None, gt=0, description="smallest width along y (rows); None = sigma0 (px)")
    A_x: float | None = Field(None, description="cubic coefficient of the x width; None = A (-)")
    B_x: float | None = Field(None, description="quartic coefficient of the x width; None = B (-)")
    A_y: float | None = Field(None, description="cubic coefficient of the y width; None = A (-)")
    B_y: float | None = Field(None, description="quartic coefficient of the y width; None = B (-)")
    spline_path: str | None = Field(None, description="path of a SMAP *_3dcal.mat calibration (file)")
    roi_size: int | None = Field(
        None, ge=3, description="side of the square ROI rendered per emitter; None = automatic (px)")

    @model_validator(mode="after")
    def _spline_needs_path(self) -> "PSFConfig":
        if self.kind == "spline" and not self.spline_path:
            raise ValueError("kind 'spline' needs spline_path (a SMAP *_3dcal.mat file)")
        # a dumped config carries gamma at its default next to the per-axis planes: only a changed gamma conflicts
        if (self.gamma != type(self).model_fields["gamma"].default
                and (self.focal_x is not None or self.focal_y is not None)):
            raise ValueError("give either gamma or focal_x/focal_y (per-axis focal planes, nm), not both")
        return self

    def astigmatic_axes(self) -> dict[str, float]:
        """The per-axis astigmatic parameters with the shorthand filled in: sigma0_x, focal_x, depth_x,
        A_x, B_x and the same for y (px, nm, nm, -, -)."""
        def pick(value, default):
            return float(default if value is None else value)
        return dict(
            sigma0_x=pick(self.sigma0_x, self.sigma0), focal_x=pick(self.focal_x, -self.gamma),
            depth_x=pick(self.depth_x, self.depth), A_x=pick(self.A_x, self.A), B_x=pick(self.B_x, self.B),
            sigma0_y=pick(self.sigma0_y, self.sigma0), focal_y=pick(self.focal_y, self.gamma),
            depth_y=pick(self.depth_y, self.depth), A_y=pick(self.A_y, self.A), B_y=pick(self.B_y, self.B))


class BackgroundConfig(StrictModel):
    """Background: one uniform level per frame and channel, optionally modulated by a smooth pattern."""

    uniform: tuple[float, float] = Field((20.0, 100.0), description="level drawn uniformly in [min, max] per frame (photons/px)")
    smooth_amplitude: float = Field(
        0.0, ge=0, lt=1, description="peak relative modulation of a smooth random pattern, 0 = flat (fraction of the level)")
    smooth_length: float = Field(8.0, gt=0, description="correlation length of the smooth pattern (px)")

    @field_validator("uniform")
    @classmethod
    def _uniform(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] < 0:
            raise ValueError(f"background min {v[0]} < 0; background photons cannot be negative")
        return _check_range("uniform", v)


class CameraConfig(StrictModel):
    """Camera forward model (photons -> ADU) and its inverse.

    * ``emccd``: Poisson(qe·x + spur) -> Gamma(shape=counts, scale=em_gain) -> + N(0, read_noise)
      -> / e_per_adu -> floor -> + baseline -> clip to [0, 65535].
    * ``scmos``: Poisson(qe·x) -> + N(0, read_noise) -> / e_per_adu -> floor -> + baseline; the scalars
      can be replaced by per-pixel maps (offset ADU, read-noise variance ADU², e-/ADU).
    * ``perfect``: Poisson(x) only; ADU are photons.

    ``preset='challenge2016'`` fills baseline 100, 45 e-/ADU, EM gain 300, read noise 74.4 e-,
    spurious charge 0.002, QE 0.9 (fields given explicitly win).
    """

    preset: Literal["challenge2016"] | None = Field(None, description="named camera whose values fill unset fields (-)")
    kind: Literal["emccd", "scmos", "perfect"] = Field("emccd", description="camera model (-)")
    qe: float = Field(0.9, gt=0, le=1, description="quantum efficiency (e-/photon)")
    spurious_charge: float = Field(0.002, ge=0, description="EMCCD clock-induced charge (e-/px/frame)")
    em_gain: float = Field(300.0, ge=1, description="EMCCD electron-multiplying gain (-)")
    read_noise: float = Field(74.4, ge=0, description="Gaussian read noise, standard deviation (e-)")
    e_per_adu: float = Field(45.0, gt=0, description="conversion factor (e-/ADU)")
    baseline: float = Field(100.0, description="offset added to every pixel (ADU)")
    clip_16bit: bool = Field(True, description="clip ADU to the 16-bit range [0, 65535] (-)")
    scmos_offset_map: str | None = Field(None, description="sCMOS per-pixel offset map, .npy or .tif, HxW (ADU)")
    scmos_variance_map: str | None = Field(None, description="sCMOS per-pixel read-noise variance map, .npy or .tif (ADU²)")
    scmos_e_per_adu_map: str | None = Field(None, description="sCMOS per-pixel conversion map, .npy or .tif (e-/ADU)")
    scmos_maps: str | None = Field(
        None, description="one .npz holding the sCMOS maps: offset_adu (ADU), variance_adu2 (ADU²), e_per_adu (e-/ADU); "
                          "a field above given too wins for its map (file)")
    roi_origin: tuple[int, int] | None = Field(
        None, description="(row, column) of the movie's top-left pixel on full-chip sCMOS maps, used at inference; "
                          "None = the maps have the movie's size (a smaller movie is then refused) (px)")
    scmos_training_crop: Literal["random", "roi"] = Field(
        "random", description="training frames smaller than the maps: 'random' = a fresh crop of the maps per sample, "
                              "'roi' = always the crop at roi_origin (-)")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            preset = CAMERA_PRESETS.get(data["preset"])
            if preset is not None:  # an unknown name is reported by the Literal check
                data = {**preset, **data}
        return data


class DyeConfig(StrictModel):
    """One dye of a two-channel ratiometric experiment."""

    ratio_mean: float = Field(0.5, ge=0, le=1, description="mean fraction of photons in channel 1 (-)")
    ratio_sd: float = Field(0.0, ge=0, description="spread of that fraction between molecules, clipped to [0, 1] (-)")
    probability: float = Field(1.0, ge=0, description="relative abundance of this dye (normalised over the table) (-)")


class ChannelsConfig(StrictModel):
    """Number of camera channels and, for two, how photons are split between them."""

    n_channels: Literal[1, 2] = Field(1, description="1 = single channel, 2 = ratiometric two-channel (-)")
    dyes: list[DyeConfig] = Field(default_factory=lambda: [DyeConfig()], description="dye table (-)")
    background: list[tuple[float, float]] | None = Field(
        None, description="per-channel uniform background range, one (min, max) per channel; None = background.uniform (photons/px)")
    affine: list[list[float]] | None = Field(
        None, description="2x3 affine map from channel-1 to channel-2 pixel coordinates, [x2, y2] = M @ [x1, y1, 1] (px)")

    @field_validator("dyes")
    @classmethod
    def _dyes(cls, v: list[DyeConfig]) -> list[DyeConfig]:
        if not v:
            raise ValueError("the dye table is empty; give at least one dye")
        if sum(d.probability for d in v) <= 0:
            raise ValueError("dye probabilities sum to 0; give at least one positive probability")
        return v

    @field_validator("background")
    @classmethod
    def _bg(cls, v: list[tuple[float, float]] | None) -> list[tuple[float, float]] | None:
        if v is not None:
            for r in v:
                if r[0] < 0:
                    raise ValueError(f"background min {r[0]} < 0; background photons cannot be negative")
                _check_range("background", r)
        return v

    @field_validator("affine")
    @classmethod
    def _affine(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        if v is not None and (len(v) != 2 or any(len(row) != 3 for row in v)):
            raise ValueError("affine must be a 2x3 matrix [[a, b, tx], [c, d, ty]] (px)")
        return v

    @model_validator(mode="after")
    def _bg_per_channel(self) -> "ChannelsConfig":
        if self.background is not None and len(self.background) != self.n_channels:
            raise ValueError(f"background has {len(self.background)} ranges for {self.n_channels} channel(s); "
                             "give one (min, max) per channel")
        return self


class SimulationConfig(StrictModel):
    """Everything the simulator needs; ``Simulator(SimulationConfig(...))``."""

    frame: FrameConfig = Field(default_factory=FrameConfig, description="frame size and pixel size")
    emitters: EmitterConfig = Field(default_factory=EmitterConfig, description="blinking emitters")
    psf: PSFConfig = Field(default_factory=PSFConfig, description="point-spread function")
    background: BackgroundConfig = Field(default_factory=BackgroundConfig, description="background")
    camera: CameraConfig = Field(default_factory=CameraConfig, description="camera noise model")
    channels: ChannelsConfig = Field(default_factory=ChannelsConfig, description="channels and dyes")
    seed: int = Field(0, ge=0, description="base seed of the simulation random streams (-)")
