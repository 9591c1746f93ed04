"""The simulator: blinking emitters -> PSF render -> background -> camera (ADU), one or two channels.

    sim = Simulator(SimulationConfig(...))
    movie = sim.sample(100, torch.Generator().manual_seed(0))        # a correlated movie
    batch = sim.sample_windows(64, torch.Generator().manual_seed(1))  # 64 independent 3-frame clips

Everything runs on the device of the generator (pass ``torch.Generator("cuda")`` for the GPU) and
is reproducible for a given generator state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from decode_accel.errors import DecodeAccelError

from .background import sample_background
from .camera import Camera
from .config import SimulationConfig
from .emitters import EmitterFrames, sample_blinking
from .psf import PSF, SplinePSF, make_psf


@dataclass
class SimulatedMovie:
    """A simulated movie (see docs/architecture.md, "Simulation -> data").

    Attributes:
        frames_adu: float32 (T, C, H, W) camera counts (ADU).
        frames_photons: float32 (T, C, H, W) the ADU mapped back to photons by ``camera.to_photons``.
        bg: float32 (T, C, H, W) expected background (photons/px).
        emitters: DataFrame of every emitter-frame that is on (rendered), table convention: frame,
            x, y, z (nm), photons, id, ratio, photons_ch1, photons_ch2, color (dye index).
            One channel: ratio 1, photons_ch2 0.
        label_min_photons: emitter-frames below this are in ``emitters`` but not in ``labels``.
        px_size: nm per px.
        roi_origin: (row, col) of the movie's top-left pixel on full-chip sCMOS maps (px); (0, 0)
            without maps. ``camera.to_photons(adu, origin=roi_origin)`` converts its ADU again.
    """

    frames_adu: torch.Tensor
    frames_photons: torch.Tensor
    bg: torch.Tensor
    emitters: pd.DataFrame
    label_min_photons: float = 0.0
    px_size: float = 100.0
    roi_origin: tuple[int, int] = (0, 0)

    @property
    def labels(self) -> pd.DataFrame:
        """Training targets: the emitter-frames with at least ``label_min_photons`` photons."""
        return self.emitters[self.emitters["photons"] >= self.label_min_photons].reset_index(drop=True)


def emitters_table(em: EmitterFrames, px_size: float) -> pd.DataFrame:
    """EmitterFrames (px) -> localization table (nm), one row per on emitter-frame."""
    xyz = em.xyz.detach().cpu().double().numpy()
    photons = em.photons.detach().cpu().double().numpy()
    ratio = em.ratio.detach().cpu().double().numpy()
    return pd.DataFrame({
        "frame": em.frame.cpu().numpy().astype(np.int64),
        # pixel-centre convention: x_px = j + 0.5 <-> x_nm = (j + 0.5)·px, so nm = px · px_size
        "x": xyz[:, 0] * px_size,
        "y": xyz[:, 1] * px_size,
        "z": xyz[:, 2],
        "photons": photons,
        "id": em.id.cpu().numpy().astype(np.int64),
        "ratio": ratio,
        "photons_ch1": photons * ratio,
        "photons_ch2": photons * (1.0 - ratio),
        "color": em.color.cpu().numpy().astype(np.int64),
    })


class Simulator:
    """SMLM movie simulator built from a :class:`SimulationConfig`.

    Attributes:
        config: the config it was built from.
        camera: :class:`Camera`; ``camera.to_photons(adu)`` is the inverse used at inference.
        psf: the :class:`~decode_accel.simulation.psf.PSF` used to render.
    """

    def __init__(self, config: SimulationConfig, *, _psf: PSF | None = None, _camera: Camera | None = None):
        self.config = config
        f = config.frame
        self.psf = _psf if _psf is not None else make_psf(config.psf, config.emitters.z_range)
        self.camera = _camera if _camera is not None else Camera(config.camera, (f.height, f.width))
        ch = config.channels
        self.n_channels = ch.n_channels
        self.bg_ranges = list(ch.background) if ch.background is not None else [config.background.uniform] * ch.n_channels
        self.affine = torch.tensor(ch.affine, dtype=torch.float64) if ch.affine is not None else None
        if isinstance(self.psf, SplinePSF):
            lo, hi = self.psf.z_range
            zmin, zmax = config.emitters.z_range
            if zmin < lo - 1e-6 or zmax > hi + 1e-6:
                raise DecodeAccelError(f"emitters.z_range ({zmin:g}, {zmax:g}) nm exceeds the calibrated range "
                                       f"({lo:g}, {hi:g}) nm", path=config.psf.spline_path, field="emitters.z_range",
                                       fix="narrow emitters.z_range to the calibrated range")

    def generator(self, *keys: int, device: str | torch.device = "cpu") -> torch.Generator:
        """A generator seeded from (config.seed, *keys), e.g. ``sim.generator(step, rank, worker)``.

        Distinct key tuples give independent streams (numpy SeedSequence hashing), so resumed or
        multi-process runs can regenerate exactly the samples of a given step without overlap.
        """
        state = np.random.SeedSequence([self.config.seed, *[int(k) for k in keys]]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator(device).manual_seed(int(state))

    # ------------------------------------------------------------------ curriculum
    def with_overrides(self, *, density: float | None = None, emitters_per_frame: float | None = None,
                       photons_mean: float | None = None, photons_sd: float | None = None,
                       background: tuple[float, float] | None = None,
                       channel_background: list[tuple[float, float]] | None = None) -> "Simulator":
        """A new Simulator with a changed difficulty (for curricula); this one is unchanged.

        Args:
            density: mean visible emitters per frame per µm² (replaces emitters_per_frame).
            emitters_per_frame: mean visible emitters per frame (replaces density).
            photons_mean, photons_sd: photons per full frame (photons).
            background: uniform background range (photons/px) for every channel.
            channel_background: per-channel ranges (photons/px), two-channel.

        The PSF and camera objects are shared (no file is read again).
        """
        data = self.config.model_dump()
        em = data["emitters"]
        if density is not None or emitters_per_frame is not None:
            em["density"], em["emitters_per_frame"] = density, emitters_per_frame
        if photons_mean is not None:
            em["photons_mean"] = photons_mean
        if photons_sd is not None:
            em["photons_sd"] = photons_sd
        if background is not None:
            data["background"]["uniform"] = tuple(background)
            if data["channels"]["background"] is not None:
                data["channels"]["background"] = [tuple(background)] * self.n_channels
        if channel_background is not None:
            data["channels"]["background"] = [tuple(r) for r in channel_background]
        cfg = SimulationConfig.model_validate(data)
        return Simulator(cfg, _psf=self.psf, _camera=self.camera)

    # ------------------------------------------------------------------ core
    def _simulate(self, n_frames: int, clip_length: int, g: torch.Generator):
        """Frames of n_frames / clip_length independent clips. Returns (adu, photons, bg, EmitterFrames)."""
        return self._simulate_roi(n_frames, clip_length, g)[:4]

    def _simulate_roi(self, n_frames: int, clip_length: int, g: torch.Generator):
        """As :meth:`_simulate`, plus the (n_frames, 2) crop origins on full-chip sCMOS maps (or None)."""
        cfg = self.config
        H, W = cfg.frame.height, cfg.frame.width
        C = self.n_channels
        n_visible = cfg.emitters.mean_visible(cfg.frame)
        em = sample_blinking(cfg.emitters, cfg.channels, n_visible, n_frames, H, W, g, clip_length=clip_length)
        bg = sample_background(cfg.background, self.bg_ranges, n_frames, H, W, g, pattern_every=clip_length)
        x = bg.clone().view(n_frames * C, H, W)
        xyz = em.xyz.float()
        if C == 1:
            self.psf.render(xyz, em.photons.float(), em.frame, x)
        else:
            r = em.ratio.float()
            self.psf.render(xyz, em.photons.float() * r, em.frame * C, x)
            xyz2 = xyz
            if self.affine is not None:
                a = self.affine.to(device=xyz.device, dtype=torch.float32)
                xy2 = xyz[:, :2] @ a[:, :2].T + a[:, 2]
                xyz2 = torch.cat([xy2, xyz[:, 2:]], dim=1)
            self.psf.render(xyz2, em.photons.float() * (1.0 - r), em.frame * C + 1, x)
        x = x.view(n_frames, C, H, W)
        # full-chip sCMOS maps: each clip (training sample) sees its own random crop of the chip
        origins = self.camera.crop_origins(n_frames // clip_length, (H, W), g)
        if origins is not None:
            origins = origins.repeat_interleave(clip_length, dim=0)
        elif self.camera.map_shape is not None and tuple(self.camera.map_shape) != (H, W):
            origins = torch.tensor([self.camera.roi_origin or (0, 0)], device=x.device).expand(n_frames, 2)
        adu = self.camera.forward(x, g, origin=origins)
        return adu, self.camera.to_photons(adu, origin=origins), bg, em, origins

    def sample(self, n_frames: int, generator: torch.Generator) -> SimulatedMovie:
        """Simulate a movie of ``n_frames`` consecutive frames (blinking correlated over frames).

        Args:
            n_frames: number of frames T (>= 1).
            generator: random generator; tensors are made on its device.

        Returns:
            :class:`SimulatedMovie` with frames_adu, frames_photons, bg (T, C, H, W) and the
            emitter table in nm.
        """
        if n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {n_frames}")
        adu, photons, bg, em, origins = self._simulate_roi(n_frames, n_frames, generator)
        roi = (0, 0) if origins is None else (int(origins[0, 0]), int(origins[0, 1]))
        return SimulatedMovie(frames_adu=adu, frames_photons=photons, bg=bg,
                              emitters=emitters_table(em, self.config.frame.px_size),
                              label_min_photons=self.config.emitters.label_min_photons,
                              px_size=self.config.frame.px_size, roi_origin=roi)

    def sample_windows(self, batch_size: int, generator: torch.Generator, with_adu: bool = False,
                       with_variance: bool = False) -> dict[str, torch.Tensor]:
        """``batch_size`` independent 3-frame clips, as a training batch (docs/architecture.md "Batch").

        All clips are simulated in one vectorised pass (faster than looping ``sample(3)``); each has
        stationary blinking statistics of its own.

        Returns:
            dict with ``frames`` (B, C, 3, H, W) photons; ``bg`` (B, C, H, W) expected background of
            the central frame (photons/px); the central frame's labels (photons >=
            ``label_min_photons``) padded to M = max(1, max count): ``tgt_xyz`` (B, M, 3) x, y in px,
            z in nm; ``tgt_photons`` (B, M); ``tgt_ratio`` (B, M) (0.5 for one channel, as the batch
            contract says); ``tgt_mask`` (B, M) bool. With ``with_adu`` also ``frames_adu``. With
            ``with_variance`` also ``variance`` (B, C, H, W): each clip's crop of the per-pixel sCMOS
            read-noise variance map in photons² (:meth:`Camera.read_variance_photons`, the crop its noise
            was drawn with; no random numbers are used for it, so the clips are the same either way).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        B, C = batch_size, self.n_channels
        H, W = self.config.frame.height, self.config.frame.width
        adu, photons, bg, em, origins = self._simulate_roi(3 * B, 3, generator)
        device = generator.device
        central = (em.frame % 3 == 1) & (em.photons >= self.config.emitters.label_min_photons)
        em = em.select(central)
        clip = em.frame // 3
        counts = torch.bincount(clip, minlength=B)
        M = max(1, int(counts.max()) if counts.numel() else 1)
        # rows are sorted by frame, so the rank of a row inside its clip is its index minus the clip's start
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(clip.numel(), device=device) - start[clip]
        tgt_xyz = torch.zeros(B, M, 3, device=device)
        tgt_ph = torch.zeros(B, M, device=device)
        tgt_ratio = torch.full((B, M), 0.5, device=device)
        mask = torch.zeros(B, M, dtype=torch.bool, device=device)
        tgt_xyz[clip, slot] = em.xyz.float()
        tgt_ph[clip, slot] = em.photons.float()
        if C == 2:
            tgt_ratio[clip, slot] = em.ratio.float()
        mask[clip, slot] = True
        out = {
            "frames": photons.view(B, 3, C, H, W).transpose(1, 2).contiguous(),
            "bg": bg.view(B, 3, C, H, W)[:, 1].contiguous(),
            "tgt_xyz": tgt_xyz, "tgt_photons": tgt_ph, "tgt_ratio": tgt_ratio, "tgt_mask": mask,
        }
        if with_adu:
            out["frames_adu"] = adu.view(B, 3, C, H, W).transpose(1, 2).contiguous()
        if with_variance:
            out["variance"] = self.camera.read_variance_photons(
                (B, C, H, W), None if origins is None else origins[::3], device=device)
        return out
