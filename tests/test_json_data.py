"""One JSON sanitiser (io._json.to_json_data) and one dict flattener (training.config.dicts.flatten_dict)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from decode_accel.io import to_json_data, write_json
from decode_accel.training.config import TrainingConfig
from decode_accel.training.config.dicts import flatten_dict


def test_json_data_has_null_for_non_finite_numbers_and_plain_values_for_numpy_torch_paths_and_configs():
    data = {"nan": float("nan"), "inf": np.float32("inf"), "f64": np.float64(0.25), "i64": np.int64(3),
            "flag": np.bool_(True), "vector": torch.tensor([1.0, float("-inf")]), "scalar": torch.tensor(2.5),
            "array": np.arange(4).reshape(2, 2), "tuple": (1, (2, float("nan"))), "set": {7}, "path": Path("/a/b"),
            1: "int key", "section": TrainingConfig().operating_point}
    out = to_json_data(data)
    assert out == {"nan": None, "inf": None, "f64": 0.25, "i64": 3, "flag": True, "vector": [1.0, None],
                   "scalar": 2.5, "array": [[0, 1], [2, 3]], "tuple": [1, [2, None]], "set": [7], "path": "/a/b",
                   "1": "int key", "section": {"enable": True, "frames": None, "equalisation_emitter_frames": None,
                                               "simulation": {}}}
    assert type(out["f64"]) is float and type(out["i64"]) is int and type(out["flag"]) is bool
    json.dumps(out, allow_nan=False)  # strict JSON


def test_the_training_log_writes_non_finite_numbers_as_text_and_checkpoints_keep_them():
    values = [float("nan"), float("inf"), -np.inf, 1.0]
    assert to_json_data(values, nonfinite="text") == ["nan", "inf", "-inf", 1.0]
    kept = to_json_data({"best": float("inf")}, nonfinite="keep")
    assert json.loads(json.dumps(kept)) == {"best": math.inf}  # Python's json reads it back: a resume sees inf


def test_an_object_that_is_not_json_data_is_a_type_error_unless_a_default_is_given():
    with pytest.raises(TypeError, match="object is not JSON data"):
        to_json_data({"x": object()})
    assert to_json_data({"x": complex(1, 2)}, default=str) == {"x": "(1+2j)"}


def test_write_json_writes_strict_json_atomically(tmp_path):
    path = write_json({"loss": float("nan"), "n": np.int32(2)}, tmp_path / "deep" / "m.json")
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in strict JSON")) == \
        {"loss": None, "n": 2}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]  # no temporary file left


def test_the_one_flattener_keeps_lists_and_empty_mappings_as_leaves_and_makes_tracker_scalars_on_request():
    tree = {"emitters": {"density": 0.5, "z_range": [-600, 600]}, "kwargs": {}, "seed": None}
    assert flatten_dict(tree) == {"emitters.density": 0.5, "emitters.z_range": [-600, 600], "kwargs": {},
                                  "seed": None}
    assert flatten_dict(tree, scalars=True) == {"emitters.density": 0.5, "emitters.z_range": "[-600, 600]",
                                                "kwargs": "{}", "seed": "null"}
    hparams = TrainingConfig().flat_dict()  # what TensorBoard and W&B receive
    assert all(isinstance(v, (bool, int, float, str)) for v in hparams.values())
    assert json.loads(hparams["simulation.emitters.z_range"]) == list(TrainingConfig().simulation.emitters.z_range)
