"""notebooks/05_real_movie.ipynb runs top to bottom on the recorded sCMOS movie (QUICK sizes) and its figures
are sane. Skipped where the recorded movie is not available."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_real_movie.ipynb"
REAL = Path(os.environ.get("DECODE_ACCEL_REALDATA", ROOT.parent / "shared" / "realdata" / "hamamatsu_scmos_storm"))
KERNEL = "decode_accel_real_movie_test"


def _generator():
    spec = importlib.util.spec_from_file_location("make_05_real_movie", ROOT / "notebooks" / "make_05_real_movie.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebook_matches_its_generator():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    built = _generator().build()
    assert [c.source for c in committed.cells] == [c.source for c in built.cells]
    assert all(not c.get("outputs") for c in committed.cells if c.cell_type == "code")


@pytest.mark.skipif(not (REAL / "movie.tif").exists(), reason="recorded movie not available")
def test_real_movie_notebook_runs(tmp_path, monkeypatch):
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "decode_accel (test)", "language": "python"}))
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("DECODE_ACCEL_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("DECODE_ACCEL_NOTEBOOK_OUT", str(run / "outputs"))
    monkeypatch.setenv("DECODE_ACCEL_REALDATA", str(REAL))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name=KERNEL, resources={"metadata": {"path": str(run)}}).execute()
    out = run / "outputs" / "real_movie"
    s = json.loads((out / "summary.json").read_text())
    # the written config trains and predicts without edits
    assert (out / "real.yaml").exists() and (out / "real_vs_simulated.png").exists()
    assert s["updates"] == 200 and s["loss_last"] < s["loss_first"]
    est = s["estimates"]
    assert 0.5 < est["PSF sigma"][0] < 3.0 and est["PSF sigma"][1] > 0
    assert 0.0 <= s["figures"]["ks_pixels"] < 0.5
    # both methods find molecules; agreement figures are defined and distances are sub-pixel
    assert s["n_ours"] > 0 and s["n_picasso"] > 0
    a = s["agreement"]
    assert len(a["per_frame_ours"]) == 11 and len(a["per_frame_theirs"]) == 11
    for k in ("bright_theirs_found", "bright_ours_found"):
        assert 0.0 <= a[k] <= 1.0
    for k in ("distance_theirs_nm", "distance_ours_nm"):
        assert math.isnan(a[k]) or 0.0 <= a[k] <= 160.0
    assert (out / "decode_accel_locs.hdf5").exists() and (out / "decode_accel_render.png").exists()
    assert s["n_events"] > 0
