"""What a trained model is: the export folder, written by training and read by inference.

An export folder is self-contained (nothing of training: no optimizer, no RNG):

    model.safetensors   weights (written by the model's ``save_pretrained``)
    config.json         constructor arguments of the network, including its input/output Scaling and
                        variance_input (the network reads the sCMOS read-noise variance map too)
    decode_accel.json   format_version, architecture, px_size_nm, frame size, n_channels, variance_input, camera, psf,
                        channels and dye table, scaling, the full simulation config, metrics, and the
                        operating point (the detection threshold the model was validated at, see
                        decode_accel.pipeline.choose_operating_point; predict uses it by default)
    README.md           model card: training data, training summary, accuracy, intended use, how to run
    assets/             files the simulation config points to (spline PSF calibration, sCMOS maps)

``export_model`` writes it atomically, ``load_exported`` reads a folder or a Hub id back into an
``ExportedModel``, ``model_card`` is the README, ``dye_table`` the one dye-table form every room uses
(rows ``{name, ratio, ratio_sd, prob}``), ``default_export_dir`` the one default place of the folder
(``export/`` beside the run's ``checkpoints/``). Pushing a folder to the Hub is :mod:`decode_accel.hub`.

This room sits low in the flow (above simulation and models, below inference and training): it
imports neither of them, so both can import it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

import decode_accel
from decode_accel.errors import DecodeAccelError
from decode_accel.io._atomic import fsync_tree, give_umask_mode, swap_folder
from decode_accel.io._json import to_json_data
from decode_accel.models.config import ARCHITECTURES
from decode_accel.models.variance import reads_variance
from decode_accel.simulation.camera import Camera
from decode_accel.simulation.config import SimulationConfig

EXPORT_FORMAT_VERSION = 1
METADATA_FILE = "decode_accel.json"
REQUIRED_FILES = (METADATA_FILE, "config.json", "model.safetensors")
ASSETS = "assets"
#: the export folder's name in a run folder (beside ``checkpoints/`` and ``logs/``)
EXPORT_DIR_NAME = "export"
# simulation-config fields that name files; they are copied into assets/ on export
_FILE_FIELDS = (("psf", "spline_path"), ("camera", "scmos_offset_map"), ("camera", "scmos_variance_map"),
                ("camera", "scmos_e_per_adu_map"), ("camera", "scmos_maps"))
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

__all__ = ["ExportedModel", "export_model", "load_exported", "model_card", "dye_table", "default_export_dir",
           "unwrap_model", "is_repo_id", "download", "EXPORT_FORMAT_VERSION", "METADATA_FILE", "REQUIRED_FILES"]


def default_export_dir(save_dir: str | os.PathLike) -> Path:
    """The one default place of a run's export folder: ``export/`` beside the checkpoint folder ``save_dir``
    (``runs/x/checkpoints`` -> ``runs/x/export``)."""
    return Path(save_dir).parent / EXPORT_DIR_NAME


def unwrap_model(model: torch.nn.Module, accelerator=None) -> torch.nn.Module:
    """The plain module under DDP / DataParallel / torch.compile wrappers."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model, keep_torch_compile=False)
    for _ in range(8):  # wrappers can nest (compiled DDP, DDP of a compiled module)
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            break
    return model


def dye_table(simulation_config) -> list[dict[str, Any]] | None:
    """The simulation's dyes as the dye table of the export, the post-processor and the evaluation:
    rows ``{name, ratio, ratio_sd, prob}``; None for single-channel data."""
    ch = simulation_config.channels
    if ch.n_channels < 2:
        return None
    return [{"name": f"dye{i}", "ratio": d.ratio_mean, "ratio_sd": d.ratio_sd, "prob": d.probability}
            for i, d in enumerate(ch.dyes)]


@dataclass
class ExportedModel:
    """A network read back from an export folder, with what inference needs to use it correctly.

    Attributes:
        model: the network, in eval mode.
        metadata: the contents of decode_accel.json.
        camera: ``decode_accel.simulation.Camera`` of the training data (``to_photons`` converts ADU).
        px_size_nm: pixel size in the sample plane (nm).
        n_channels: camera channels the network reads (1 or 2).
        dye_table: two-channel dyes as rows {name, ratio, ratio_sd, prob}; None for one channel.
        simulation_config: the ``SimulationConfig`` the network was trained on.
        frame_size: (height, width) of the training frames (px).
        path: the local folder.
        operating_point: the detection threshold chosen when the model was trained, on a tuning movie
            simulated from its training physics, with the precision/recall it reached there
            ({"threshold": 0-1, ...}); None for exports made without one (predict then uses the
            post-processor's default).
    """

    model: torch.nn.Module
    metadata: dict[str, Any]
    camera: Any
    px_size_nm: float
    n_channels: int
    dye_table: list[dict[str, Any]] | None
    simulation_config: Any = None
    frame_size: tuple[int, int] | None = None
    path: Path | None = field(default=None)
    operating_point: dict[str, Any] | None = None

    @property
    def threshold(self) -> float | None:
        """The detection threshold of the operating point (0-1), or None."""
        point = self.operating_point or {}
        return float(point["threshold"]) if point.get("threshold") is not None else None


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def _model_channels(model) -> int | None:
    value = getattr(model, "in_channels", None)
    return int(value) if isinstance(value, int) else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_card(name: str, meta: Mapping[str, Any], sim: SimulationConfig | None = None) -> str:
    """The export's README.md (a Hugging Face model card) from its ``decode_accel.json`` contents ``meta``
    (``sim``: the simulation config, default the one in ``meta``)."""
    sim = sim if sim is not None else SimulationConfig.model_validate(meta["simulation"])
    architecture, metrics, training = meta["architecture"], meta.get("metrics"), meta.get("training")
    cam, psf, em, bg, ch = sim.camera, sim.psf, sim.emitters, sim.background, sim.channels
    h, w = meta["frame_size"]
    lines = [
        "---",
        "library_name: decode_accel",
        "license: mit",
        "tags:",
        "- smlm",
        "- microscopy",
        "- single-molecule-localization",
        "- decode",
        "---",
        "",
        f"# {name}: {architecture} for single-molecule localization microscopy",
        "",
        f"A DECODE-style {architecture} network trained with decode_accel on simulated camera frames. It takes "
        "three consecutive frames in photons and returns per-pixel detection probability, sub-pixel position, z, "
        "photons and background with uncertainties; `decode-accel predict` turns these into a localization table "
        "(x, y, z in nm).",
        "",
        "## Trained on (simulation)",
        "",
        f"- frames: {h} x {w} px, pixel size {_fmt(meta['px_size_nm'])} nm, {meta['n_channels']} camera channel(s)",
    ]
    if cam.kind == "emccd":
        lines.append(f"- camera: EMCCD, QE {_fmt(cam.qe)}, EM gain {_fmt(cam.em_gain)}, {_fmt(cam.e_per_adu)} e-/ADU, "
                     f"baseline {_fmt(cam.baseline)} ADU, read noise {_fmt(cam.read_noise)} e-, spurious charge "
                     f"{_fmt(cam.spurious_charge)} e-/px")
    elif cam.kind == "scmos":
        lines.append(f"- camera: sCMOS, QE {_fmt(cam.qe)}, {_fmt(cam.e_per_adu)} e-/ADU, offset {_fmt(cam.baseline)} "
                     f"ADU, read noise {_fmt(cam.read_noise)} e-")
        if meta.get("variance_input"):
            lines.append("- input: besides the frames, the per-pixel read-noise variance map of the same pixels "
                         "(assets/; predict takes the movie's region of it)")
    else:
        lines.append("- camera: ideal (shot noise only, ADU = photons)")
    psf_text = {"gaussian": f"Gaussian, sigma {_fmt(psf.sigma)} px",
                "astigmatic": f"astigmatic, sigma0 {_fmt(psf.sigma0)} px, focal offset +-{_fmt(psf.gamma)} nm, "
                              f"depth {_fmt(psf.depth)} nm",
                "spline": "cubic spline calibration (assets/)"}.get(psf.kind, psf.kind)
    lines.append(f"- PSF: {psf_text}")
    density = (f"{_fmt(em.density)} per um^2" if getattr(em, "density", None) is not None
               else f"{_fmt(getattr(em, 'emitters_per_frame', None))} per frame")
    lines.append(f"- emitters: {density}; photons {_fmt(em.photons_mean)} +- {_fmt(em.photons_sd)} "
                 f"({em.photons_distribution}); z in [{_fmt(em.z_range[0])}, {_fmt(em.z_range[1])}] nm; mean on-time "
                 f"{_fmt(em.on_time_mean)} frames")
    lines.append(f"- background: uniform in [{_fmt(bg.uniform[0])}, {_fmt(bg.uniform[1])}] photons/px")
    if meta["dye_table"]:
        lines += ["", "| dye | ratio (fraction in channel 1) | ratio sd | abundance |", "|---|---|---|---|"]
        lines += [f"| {d['name']} | {_fmt(d['ratio'])} | {_fmt(d['ratio_sd'])} | {_fmt(d['prob'])} |"
                  for d in meta["dye_table"]]
    if training is not None:
        ts, data, opt = training["training_strategy"], training["data"], training["optimizer"]
        lines += ["", "## Training", ""]
        lines.append(f"- {ts['epochs']} epochs, batch size {data['batch_size']}, "
                     f"{opt['type']} (lr {_fmt(opt['lr'])}, weight decay {_fmt(opt['weight_decay'])}), "
                     f"schedule {training['scheduler']['type']}")
        lines.append(f"- loss {training['loss']['type']}, mixed precision {ts['mixed_precision']}, gradient clipping "
                     f"{_fmt(ts['gradient_clipping'])}, seed {ts['seed']}")
        source = data.get("data_path") or "simulated on the fly"
        lines.append(f"- data: {source}; {data.get('samples_per_epoch') or '-'} samples per epoch")
    lines += ["", "## Accuracy", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    else:
        lines.append("No evaluation metrics were recorded with this export.")
    point = meta.get("operating_point")
    lines += ["", "## Operating point", ""]
    if point:
        where = point.get("chosen_on") or "a tuning movie"
        lines.append(f"`decode-accel predict` keeps localizations with detection probability >= "
                     f"{_fmt(float(point['threshold']))} by default (chosen on {where}; there: "
                     + ", ".join(f"{k} {_fmt(point[k])}" for k in ("precision", "recall", "jaccard") if k in point)
                     + "). Pass `--threshold` to trade recall for precision.")
        corrections = []
        equalisation = point.get("subpixel_equalisation")
        if equalisation:
            ox, oy = (float(v) * float(meta["px_size_nm"]) for v in equalisation.get("offset", (0.0, 0.0)))
            corrections.append(f"sub-pixel fractions equalised and a constant offset of {ox:+.2f} / {oy:+.2f} nm "
                               "(x / y) removed")
            if equalisation.get("border"):
                sides = ", ".join(equalisation["border"].get("sides", {}))
                corrections.append(f"positions within 2 px of the frame border mapped so that their mean error is ~0 "
                                   f"at every distance from it ({sides})")
        if point.get("z_calibration"):
            corrections.append("z mapped so that its mean error is ~0 at every depth (z sigmas widened to match)")
        if corrections:
            lines.append("Positions are corrected as measured on a simulated movie of the training physics: "
                         + "; ".join(corrections) + ".")
    else:
        lines.append("None recorded: `decode-accel predict` uses the post-processor's default threshold (0.3).")
    lines += [
        "",
        "## Intended use and limits",
        "",
        "- Use it on movies recorded with the camera, pixel size and PSF above, and with emitter brightness, "
        "density and background inside the trained ranges. Outside them the network's outputs, and its "
        "uncertainties, are not reliable: train a new model on a matching simulation instead.",
        "- Input movies are in camera ADU; the stored camera converts them to photons before the network. A camera "
        "with another gain or offset needs `--camera camera.yaml` or a new model.",
        ("- The Gaussian PSF carries no z information: treat the z outputs as meaningless." if psf.kind == "gaussian"
         else f"- z is only meaningful within [{_fmt(em.z_range[0])}, {_fmt(em.z_range[1])}] nm."),
        "- Not for clinical or diagnostic use.",
        "",
        "## How to run",
        "",
        "```bash",
        "decode-accel predict --model DIR --input movie.tif --out locs.csv",
        "```",
        "",
        "```python",
        "from decode_accel.export import load_exported",
        "exported = load_exported('DIR')  # or a Hub id",
        "model, camera, px_size_nm = exported.model, exported.camera, exported.px_size_nm",
        "```",
        "",
        f"Exported with decode_accel {decode_accel.__version__} (export format {EXPORT_FORMAT_VERSION}).",
        "",
    ]
    return "\n".join(lines)


def _copy_assets(sim_data: dict, folder: Path) -> dict:
    """Copy files named by the simulation config into assets/ and point the config at the copies."""
    for section, key in _FILE_FIELDS:
        value = sim_data.get(section, {}).get(key)
        if not value:
            continue
        src = Path(value)
        if not src.is_file():
            raise DecodeAccelError("file named by the simulation config not found", path=src,
                                   field=f"simulation.{section}.{key}", fix="fix the path before exporting")
        (folder / ASSETS).mkdir(exist_ok=True)
        dest = folder / ASSETS / f"{section}_{key}{''.join(src.suffixes)}"
        shutil.copy2(src, dest)
        sim_data[section][key] = f"{ASSETS}/{dest.name}"
    return sim_data


def export_model(out_dir: str | os.PathLike, model: torch.nn.Module, *, simulation_config: Any,
                 metrics: Mapping[str, Any] | None = None, training_config: Any = None,
                 accelerator=None, name: str | None = None,
                 operating_point: Mapping[str, Any] | None = None) -> Path:
    """Write a self-contained export folder for inference and the Hub (atomically).

    Args:
        out_dir: the folder to create (replaced if it is an earlier export; any other non-empty
            folder is refused).
        model: a trained SigmaMUNet/DoubleMUNet (wrapped or compiled models are unwrapped).
        simulation_config: the ``SimulationConfig`` (or dict) the model was trained on: pixel size,
            frame size, camera, PSF, channels and dyes come from it.
        metrics: accuracy figures for the model card (e.g. JI, RMSE_lat in nm).
        training_config: the ``TrainingConfig`` (or dict), summarised in the model card.
        accelerator: unwraps a prepared model with ``keep_torch_compile=False``.
        name: title of the model card (default: the folder name).
        operating_point: {"threshold": 0-1, ...}: the detection threshold the model was validated at
            (predict's default) and where it was chosen; see ``pipeline.choose_operating_point``.

    Returns:
        The export folder.
    """
    out_dir = Path(out_dir)
    net = unwrap_model(model, accelerator)
    if not hasattr(net, "save_pretrained"):
        raise DecodeAccelError(f"{type(net).__name__} has no save_pretrained", field="model",
                               fix="export a decode_accel network (SigmaMUNet or DoubleMUNet)")
    sim = simulation_config if isinstance(simulation_config, SimulationConfig) else \
        SimulationConfig.model_validate(simulation_config)
    training = to_json_data(training_config, default=str)  # a pydantic config or a mapping; None stays None
    n_channels = sim.channels.n_channels
    if operating_point is not None:
        threshold = operating_point.get("threshold")
        if not (isinstance(threshold, (int, float)) and 0.0 < float(threshold) <= 1.0):
            raise DecodeAccelError(f"threshold must lie in (0, 1], got {threshold!r}", field="operating_point.threshold",
                                   fix="pass the probability threshold the model was validated at")
    own = _model_channels(net)
    variance_input = reads_variance(net)
    if variance_input and not Camera(sim.camera).has_variance_map:
        raise DecodeAccelError("the model reads the sCMOS read-noise variance map (model.variance_input) but the "
                               "simulation config's camera has none", field="simulation_config.camera",
                               fix="pass the simulation config the model was trained on (with its sCMOS maps)")
    if own is not None and own != n_channels:
        raise DecodeAccelError(f"the model reads {own} channel(s) but the simulation config has {n_channels}",
                               field="simulation_config.channels.n_channels",
                               fix="pass the simulation config the model was trained on")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                       and not (out_dir / METADATA_FILE).is_file())):
        raise DecodeAccelError("exists and is not an export folder; refusing to overwrite it", path=out_dir,
                               fix="choose a new or empty folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        was_training = net.training
        net.eval()
        try:
            net.save_pretrained(tmp)
        finally:
            net.train(was_training)
        give_umask_mode(tmp / "model.safetensors")  # safetensors writes it 0600: colleagues could not load it
        sim_data = _copy_assets(sim.model_dump(mode="json"), tmp)
        scaling = getattr(net, "_hub_mixin_config", {}).get("scaling")
        if scaling is None and hasattr(getattr(net, "scaling", None), "model_dump"):
            scaling = net.scaling.model_dump()
        meta = {
            "format_version": EXPORT_FORMAT_VERSION,
            "decode_accel_version": decode_accel.__version__,
            "architecture": type(net).__name__,
            "px_size_nm": sim.frame.px_size,
            "frame_size": [sim.frame.height, sim.frame.width],
            "n_channels": n_channels,
            "variance_input": variance_input,
            "camera": sim_data["camera"],
            "psf": sim_data["psf"],
            "channels": sim_data["channels"],
            "dye_table": dye_table(sim),
            "scaling": scaling,
            "simulation": sim_data,
            "metrics": to_json_data(dict(metrics or {})),
            "training": training,
            "operating_point": to_json_data(operating_point),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(name or out_dir.name, meta, sim))
        fsync_tree(tmp)
        swap_folder(tmp, out_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DecodeAccelError(f"cannot write the export: {err.strerror or err}", path=out_dir,
                               fix="free disk space or choose a writable folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------

def is_repo_id(text: str) -> bool:
    """Whether ``text`` names a Hub model (``user/name``) rather than a local path."""
    return bool(REPO_ID.match(text)) and not text.startswith((".", "/"))


def download(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """The local folder of Hub model ``repo_id`` (downloaded into the Hub cache, or found there offline)."""
    # optional dependency, imported only when a Hub id is given: huggingface_hub costs ~0.3 s at start-up
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, token=token))
    except Exception as err:  # noqa: BLE001 - offline, HTTP and connection errors come in many types
        kind = type(err).__name__
        hint = ("the Hub is unreachable or HF_HUB_OFFLINE is set, and the model is not in the local cache"
                if "Offline" in kind or "LocalEntryNotFound" in kind or "Connect" in kind
                else str(err).splitlines()[0] if str(err) else kind)
        raise DecodeAccelError(f"cannot download model '{repo_id}' ({kind}: {hint})", field="model",
                               fix="check the id and the network, or pass a local export folder") from None


def _inside(folder: Path, relative: str, where: str) -> str:
    target = (folder / relative).resolve()
    if Path(relative).is_absolute() or not target.is_relative_to(folder.resolve()):
        raise DecodeAccelError(f"path '{relative}' points outside the export folder", path=folder, field=where,
                               fix="re-export the model; exports only reference files inside themselves")
    if not target.is_file():
        raise DecodeAccelError(f"missing {relative}", path=folder, field=where, fix="re-export the model")
    return os.fspath(target)


def load_exported(path_or_repo_id: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                  device: str | torch.device = "cpu") -> ExportedModel:
    """Read an export folder (local path or Hugging Face Hub id) back into an :class:`ExportedModel`.

    Raises:
        DecodeAccelError: folder not found, a required file missing, a newer export format, a
            metadata path escaping the folder, or the Hub unreachable (offline).
    """
    folder = Path(path_or_repo_id)
    if not folder.exists():
        text = os.fspath(path_or_repo_id)
        if is_repo_id(text):
            folder = download(text, revision, token)
        else:
            raise DecodeAccelError("export folder not found", path=folder,
                                   fix="pass a folder written by export_model or a Hub id like user/model")
    if not folder.is_dir():
        raise DecodeAccelError("is not an export folder", path=folder, fix="pass the folder, not a file in it")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise DecodeAccelError(f"missing {name}", path=folder,
                                   fix="export the model with decode_accel.export.export_model")
    try:
        meta = json.loads((folder / METADATA_FILE).read_text())
        version = int(meta["format_version"])
        architecture = meta["architecture"]
    except (ValueError, KeyError, TypeError):
        raise DecodeAccelError(f"{METADATA_FILE} is unreadable", path=folder, fix="re-export the model") from None
    if version > EXPORT_FORMAT_VERSION:
        raise DecodeAccelError(f"export format {version} is newer than this decode_accel understands "
                               f"({EXPORT_FORMAT_VERSION})", path=folder, fix="upgrade decode_accel")
    if architecture not in ARCHITECTURES:
        raise DecodeAccelError(f"unknown architecture '{architecture}'", path=folder / METADATA_FILE,
                               field="architecture", fix=f"use one of {', '.join(ARCHITECTURES)}")
    sim_data = json.loads(json.dumps(meta["simulation"]))
    for section, key in _FILE_FIELDS:
        value = sim_data.get(section, {}).get(key)
        if value:
            sim_data[section][key] = _inside(folder, value, f"simulation.{section}.{key}")
    try:
        sim = SimulationConfig.model_validate(sim_data)
    except Exception as err:  # noqa: BLE001 - pydantic's message names the field
        raise DecodeAccelError(f"simulation settings are invalid ({str(err).splitlines()[0]})",
                               path=folder / METADATA_FILE, fix="re-export the model") from None
    try:
        model = ARCHITECTURES[architecture].from_pretrained(folder)
    except DecodeAccelError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors/torch errors for damaged or mismatched weights
        raise DecodeAccelError(f"cannot load the weights ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
                               path=folder, fix="re-export the model") from None
    model.to(device).eval()
    frame_size = (int(meta["frame_size"][0]), int(meta["frame_size"][1]))
    camera = Camera(sim.camera, frame_shape=frame_size)
    return ExportedModel(model=model, metadata=meta, camera=camera, px_size_nm=float(meta["px_size_nm"]),
                         n_channels=int(meta["n_channels"]), dye_table=meta.get("dye_table"),
                         simulation_config=sim, frame_size=frame_size, path=folder,
                         operating_point=meta.get("operating_point"))


