"""ONNX Runtime backend of :func:`decode_accel.inference.predict` (``backend="onnx"``, ``--backend onnx``).

The network's two halves, :meth:`encode_frames` (stage 1, one frame at a time) and :meth:`decode_windows`
(stage 2 + heads + output activations), are exported to ONNX (the TorchScript-based exporter of
``torch.onnx``, batch, height and width dynamic; kept in a cache folder keyed by the weights, so a model
is exported once) and run by ONNX Runtime's CPU provider. :class:`OnnxNet` has the methods and attributes predict's frame stream uses, so the feature
cache, tiling and post-processing are the same code as with the PyTorch backend; only the network runs
elsewhere. The maps agree with PyTorch's within float32 rounding (tests/test_onnx_backend.py).

Why: on a 2-core CPU the network is most of predict's time, and ONNX Runtime fuses each convolution with
its activation and runs the small convolutions of these U-Nets with less overhead than eager PyTorch
(measured by ``benchmarks/inference.py``, issue 15.1). Optional dependency: ``pip install onnxruntime``
(the ``onnx`` extra).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decode_accel.errors import DecodeAccelError
from decode_accel.io._atomic import atomic_path
from decode_accel.inference.tiling import receptive_field_radius

__all__ = ["OnnxNet", "onnxruntime_available", "default_cache_dir"]

#: bump when the exported graphs change for the same weights (invalidates cached files)
_FORMAT = 1


def default_cache_dir() -> Path:
    """Where exported graphs are kept between runs: ``$DECODE_ACCEL_CACHE/onnx``, else ``~/.cache/decode_accel/onnx``."""
    root = os.environ.get("DECODE_ACCEL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "decode_accel") / "onnx"


def _fingerprint(net: torch.nn.Module, channels: int) -> str:
    """What the exported graphs depend on: the weights, the constructor config, the input channels, torch."""
    h = hashlib.sha256(f"{_FORMAT} {torch.__version__} {type(net).__name__} {channels}".encode())
    h.update(json.dumps(getattr(net, "_hub_mixin_config", None), sort_keys=True, default=str).encode())
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _Encode(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, frames):
        return self.net.encode_frames(frames)


class _Decode(torch.nn.Module):
    def __init__(self, net, keys):
        super().__init__()
        self.net, self.keys = net, keys

    def forward(self, f_prev, f_cur, f_next):
        out = self.net.decode_windows(f_prev, f_cur, f_next)
        return tuple(out[k] for k in self.keys)


def _export(module: torch.nn.Module, args: tuple, names: list[str]) -> bytes:
    buf = io.BytesIO()
    dynamic = {name: {0: "batch", 2: "height", 3: "width"} for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the (shape-only) input checks; legacy-exporter notice
        # grad mode on: the U-Nets then trace their ELU modules (one ONNX Elu each) rather than the in-place
        # CPU variant predict's PyTorch path uses (unet.run_layers); nothing is trained
        with torch.enable_grad():
            torch.onnx.export(module, args, buf, dynamo=False, input_names=names, dynamic_axes=dynamic,
                              opset_version=17, do_constant_folding=True)
    return buf.getvalue()


def _save(folder: Path, files: dict[str, bytes]) -> None:
    """Write the graphs atomically (temporary name + rename); a cache that cannot be written is skipped."""
    try:
        for name, data in files.items():
            with atomic_path(folder / name) as tmp:  # creates the folder; a unique temporary name per writer
                tmp.write_bytes(data)
    except OSError:
        pass


class OnnxNet:
    """A two-stage network (SigmaMUNet / DoubleMUNet) run by ONNX Runtime, with the interface predict uses.

    Args:
        net: the PyTorch network (a :class:`~decode_accel.models.two_stage.TwoStageNet`); its weights are
            exported as they are at construction (in eval mode).
        threads: ONNX Runtime's intra-op threads (default: ``torch.get_num_threads()``, which follows
            ``OMP_NUM_THREADS``).
        spinning: let idle worker threads spin (ONNX Runtime's default). Off by default here: on a CPU
            shared with other work spinning burns CPU time for little gain.
        cache_dir: folder for the exported graphs, keyed by a hash of the weights and config (default
            :func:`default_cache_dir`; None or an unwritable folder: export every time). The export costs
            about 3 CPU-seconds (importing ``torch.onnx`` and tracing), a cached graph about 0.1.

    ``encode_frames``/``decode_windows``/``__call__`` take and return CPU torch tensors (float32), like the
    network's own methods.
    """

    backend = "onnx"

    def __init__(self, net: torch.nn.Module, *, threads: int | None = None, spinning: bool = False,
                 cache_dir: str | os.PathLike | None | bool = True):
        try:
            import onnxruntime as ort  # optional: the 'onnx' extra
        except ImportError:
            raise DecodeAccelError("the ONNX backend needs onnxruntime", field="backend",
                                   fix="pip install onnxruntime (or the 'onnx' extra), or use backend='torch'") from None
        if not (hasattr(net, "encode_frames") and hasattr(net, "decode_windows")):
            raise DecodeAccelError(f"{type(net).__name__} has no encode_frames/decode_windows", field="backend",
                                   fix="use backend='torch' for this model")
        self.torch_net = net
        was_training = net.training
        net.eval()
        self.keys = tuple(net.OUTPUT_KEYS if getattr(net, "uncertainty", True) else
                          [k for k in net.OUTPUT_KEYS if not k.endswith("_sigma")])
        channels = getattr(net, "input_channels", None) or net.in_channels
        m = net.size_multiple
        example = torch.rand(2, channels, 2 * m, 2 * m) * 100
        if cache_dir is True:
            cache_dir = default_cache_dir()
        folder = Path(cache_dir) / _fingerprint(net, channels) if cache_dir else None
        try:
            with torch.no_grad():
                features = net.encode_frames(example)
                probe = net.decode_windows(features, features, features)
            self.keys = tuple(k for k in self.keys if k in probe)
            cached = folder is not None and all((folder / n).is_file() for n in ("encode.onnx", "decode.onnx"))
            if cached:
                enc, dec = (folder / "encode.onnx").read_bytes(), (folder / "decode.onnx").read_bytes()
            else:
                enc = _export(_Encode(net), (example,), ["frames"])
                dec = _export(_Decode(net, self.keys), (features, features, features), ["f_prev", "f_cur", "f_next"])
                if folder is not None:
                    _save(folder, {"encode.onnx": enc, "decode.onnx": dec})
        finally:
            net.train(was_training)
        #: whether the graphs came from the cache (for tests and benchmarks)
        self.from_cache = cached
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        self._encode = ort.InferenceSession(enc, options, providers=providers)
        self._decode = ort.InferenceSession(dec, options, providers=providers)
        # what predict's frame stream and tiling read from a network
        for name in ("in_channels", "input_channels", "frame_features", "size_multiple", "depth", "variance_input",
                     "scaling", "OUTPUT_KEYS", "uncertainty", "z_enabled"):
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))
        self.training = False

    # ------------------------------------------------------------------ the interface predict uses
    @staticmethod
    def _array(t: torch.Tensor) -> np.ndarray:
        if t.device.type != "cpu":
            raise DecodeAccelError("the ONNX backend runs on the CPU", field="device", fix="use device='cpu'")
        return np.ascontiguousarray(t.detach().float().numpy())

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Stage-1 features (N, frame_features, H, W) of frames (N, C, H, W) in photons."""
        return torch.from_numpy(self._encode.run(None, {"frames": self._array(frames)})[0])

    def decode_windows(self, f_prev: torch.Tensor, f_cur: torch.Tensor, f_next: torch.Tensor) -> dict[str, torch.Tensor]:
        """Output maps of windows from the stage-1 features of frames t-1, t, t+1 (as the network's)."""
        outs = self._decode.run(None, {"f_prev": self._array(f_prev), "f_cur": self._array(f_cur),
                                       "f_next": self._array(f_next)})
        return {k: torch.from_numpy(v) for k, v in zip(self.keys, outs)}

    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """Output maps of windows (B, C, 3, H, W), as the network's forward (three frames encoded each)."""
        if frames.ndim == 4:
            frames = frames.unsqueeze(1)
        b, c, _, h, w = frames.shape
        feats = self.encode_frames(frames.transpose(1, 2).reshape(b * 3, c, h, w)).reshape(b, 3, -1, h, w)
        return self.decode_windows(feats[:, 0], feats[:, 1], feats[:, 2])

    @property
    def receptive_field_radius(self) -> int | None:
        """The PyTorch network's (measured once, for tiling)."""
        return receptive_field_radius(self.torch_net, self.in_channels, stride=self.size_multiple)

    def eval(self) -> "OnnxNet":
        return self

    def to(self, *args: Any, **kwargs: Any) -> "OnnxNet":
        return self

    def modules(self):
        return self.torch_net.modules()
