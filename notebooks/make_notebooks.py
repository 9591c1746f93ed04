"""Writes the four tutorial notebooks of this folder (committed without outputs).

The notebooks are plain JSON and hard to review in a diff, so their source lives here, one list of
Markdown and code cells per notebook. Edit this file, then run::

    .venv/bin/python notebooks/make_notebooks.py          # rewrites notebooks/*.ipynb

``tests/test_notebooks.py`` checks that the committed notebooks equal what this script writes and
executes each of them top to bottom with tiny sizes (environment variable
``DECODE_ACCEL_NOTEBOOK_QUICK=1``; ``DECODE_ACCEL_NOTEBOOK_OUT`` chooses the output folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------------
# Shared cells
# --------------------------------------------------------------------------------------------------

PARAMETERS = '''\
import os
from pathlib import Path

import torch

# QUICK = tiny sizes that run in about a minute on a laptop CPU (the automated test sets
# DECODE_ACCEL_NOTEBOOK_QUICK=1). Set QUICK = False for a run whose numbers mean something.
QUICK = os.environ.get("DECODE_ACCEL_NOTEBOOK_QUICK", "0") == "1"
# Everything this notebook writes goes here (relative to the notebook's folder by default).
OUT = Path(os.environ.get("DECODE_ACCEL_NOTEBOOK_OUT", "outputs"))
OUT.mkdir(parents=True, exist_ok=True)
if QUICK:
    # Small networks on a shared CPU run several times faster on one thread than on competing threads.
    torch.set_num_threads(1)
print(f"QUICK={QUICK}, outputs in {OUT.resolve()}")'''

UNITS_MD = '''\
**Conventions used everywhere in decode_accel** (the same as ThunderSTORM and napari):

* The image origin is the **top-left corner** of the top-left pixel. Pixel (row *i*, column *j*) has its
  centre at x = (*j* + 0.5)·px, y = (*i* + 0.5)·px, where px is the pixel size in the sample plane (nm).
  x runs along columns, y along rows.
* Every table you see has x, y, z in **nm**; `frame` is 0-based (ThunderSTORM CSV files are 1-based).
* `photons` are *detected* photons (after the camera's quantum efficiency); background is in photons
  per pixel per frame. Cameras record **ADU**; ADU -> photons is (ADU - baseline)·(e⁻/ADU) / EM gain / QE.'''


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text)


def code(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(text)


# --------------------------------------------------------------------------------------------------
# 01: single channel
# --------------------------------------------------------------------------------------------------

NB01 = [
    md('''\
# 01 · Train a single-channel network on simulated frames

DECODE-style localization networks are trained on **simulated** camera frames: the simulator knows where
every molecule is, so it gives perfect training labels, and you can make as many frames as you want. The
network is only as good as the match between simulation and your microscope, so this notebook starts by
describing the microscope (camera, pixel size, PSF, how many molecules are on per frame, how bright they
are and the background), looks at the simulated frames, then

1. builds a `SigmaMUNet` (DECODE's two-stage U-Net, which also predicts its own uncertainty) and the
   `GaussianMMLoss` (DECODE's count + Gaussian-mixture + background loss),
2. trains it briefly with `BaseTrainer` on an endless stream of freshly simulated frames,
3. plots the loss curve and the validation metrics (Jaccard index, lateral RMSE),
4. exports a self-contained model folder that notebook 03 uses to analyse a movie.

''' + UNITS_MD),
    code(PARAMETERS),
    md('''\
## 1 · Describe the microscope

* **Pixel size** (nm): camera pixel size divided by the total magnification, e.g. 16 µm / 160 = 100 nm.
* **PSF width** (nm): the σ of a 2D Gaussian fitted to in-focus beads; here 130 nm. The simulator wants it in
  camera pixels, so we divide by the pixel size. This notebook is 2D (all molecules in focus, z = 0);
  for 3D use `psf=dict(kind="astigmatic", ...)` or a SMAP spline calibration (`kind="spline"`).
* **Camera**: `preset="challenge2016"` is the EMCCD of the SMLM Challenge 2016 (baseline 100 ADU,
  45 e⁻/ADU, EM gain 300, read noise 74.4 e⁻, QE 0.9). For an sCMOS use `kind="scmos"` with your
  baseline, e⁻/ADU and read noise (or per-pixel maps).
* **Emitters**: `density` is the mean number of molecules *visible* in a frame per µm²; `photons_mean`/`photons_sd`
  the photons of a molecule that is on for a whole frame; `on_time_mean` the mean blink length in frames.
* **Background**: one level per frame, drawn uniformly from the range (photons/px).

Frames must be a multiple of 4 px on each side (the U-Net halves them twice).'''),
    code('''\
from decode_accel.simulation import SimulationConfig, Simulator

PX_SIZE = 100.0        # nm per camera pixel in the sample plane
PSF_SIGMA_NM = 130.0   # PSF standard deviation (nm), from beads
FRAME = 32 if QUICK else 40   # simulated frame side (px); training frames can be smaller than your movie
PHOTONS = (3000.0, 1000.0)    # mean and sd of the photons per molecule and frame
BACKGROUND = (20.0, 60.0)     # background range (photons/px)

sim_config = SimulationConfig.model_validate(dict(
    frame=dict(height=FRAME, width=FRAME, px_size=PX_SIZE),
    emitters=dict(density=0.5 if QUICK else 1.0, photons_mean=PHOTONS[0], photons_sd=PHOTONS[1],
                  z_range=(0.0, 0.0), on_time_mean=1.5),
    psf=dict(kind="gaussian", sigma=PSF_SIGMA_NM / PX_SIZE),
    background=dict(uniform=BACKGROUND),
    camera=dict(preset="challenge2016"),
    seed=1,
))
simulator = Simulator(sim_config)
print(sim_config.camera)'''),
    md('''\
## 2 · Look at simulated frames

`simulator.sample(T, generator)` simulates a short movie in which molecules blink over consecutive frames.
It returns the frames in camera ADU, the same frames converted back to photons (what the network sees),
the expected background and the table of the molecules that are on (x, y in nm). We draw the frames with
`extent` in nm, so the true positions (red circles) land exactly where the table says: pixel (i, j)
covers x in [j·px, (j+1)·px).'''),
    code('''\
import matplotlib.pyplot as plt
import numpy as np

movie = simulator.sample(4, torch.Generator().manual_seed(0))
print("frames_adu", tuple(movie.frames_adu.shape), "(frames, channels, rows, columns)")
extent = (0, FRAME * PX_SIZE, FRAME * PX_SIZE, 0)   # left, right, bottom, top in nm
fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
for t, ax in enumerate(axes):
    image = ax.imshow(movie.frames_adu[t, 0].numpy(), cmap="gray", extent=extent)
    on = movie.emitters[movie.emitters["frame"] == t]
    ax.scatter(on["x"], on["y"], s=80, facecolors="none", edgecolors="red", label="true position")
    ax.set(title=f"frame {t}: {len(on)} molecules on", xlabel="x (nm)", ylabel="y (nm)")
    fig.colorbar(image, ax=ax, label="ADU")
fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center")
plt.show()
movie.emitters.head()'''),
    md('''\
A sanity check a microscopist can do by hand: after converting ADU back to photons and subtracting the
background, the frame holds about the photons of the molecules that are on (less where a PSF
is cut by the frame edge; the EMCCD's gain noise makes single pixels noisy but the sum is unbiased).'''),
    code('''\
signal = (movie.frames_photons[0, 0] - movie.bg[0, 0]).sum().item()
expected = movie.emitters.loc[movie.emitters["frame"] == 0, "photons"].sum()
print(f"frame 0: {signal:.0f} photons above background, molecules emitted {expected:.0f} photons")'''),
    md('''\
## 3 · Network and loss

`Scaling.auto` derives the network's input normalisation and output ranges from the simulation
(DECODE's rules); they are stored inside the model, so an exported model needs nothing else. `features`
sets the width of the network: DECODE uses 48 (2.2 M parameters, a GPU model); 16 trains on a CPU;
8 is for this demo. `z_enabled=False` because this simulation is 2D.'''),
    code('''\
from decode_accel.loss import GaussianMMLoss
from decode_accel.models import Scaling, SigmaMUNet

scaling = Scaling.auto(photons_mean=PHOTONS[0], photons_sd=PHOTONS[1], z_extent_nm=0.0, bg_max=BACKGROUND)
model = SigmaMUNet(in_channels=1, out_channels=5, uncertainty=True, features=8 if QUICK else 16,
                   z_enabled=False, scaling=scaling)
loss_fn = GaussianMMLoss(scaling=scaling, z_enabled=False)
print(f"{model.num_parameters():,} parameters; scaling: {scaling}")'''),
    md('''\
## 4 · Train on the fly

`create_dataloader(None, ..., simulation_config=...)` streams freshly simulated 3-frame windows (frames
t-1, t, t+1; the network localizes the molecules of frame t): the network never sees the same frame twice,
so it cannot overfit. The validation set is a fixed, separately seeded set of simulated windows.

`BaseTrainer` runs the loop with Hugging Face Accelerate (GPU if there is one, else CPU). A `PostProcessor`
turns the network's maps into a table during validation, so the trainer reports the SMLM Challenge
metrics: Jaccard index (JI, detection) and lateral RMSE (nm). A small **hook** records every term of the
loss after each optimizer update, for the loss curve.'''),
    code('''\
from decode_accel.data import create_dataloader
from decode_accel.inference.postprocess import PostProcessor
from decode_accel.training import BaseTrainer
from decode_accel.training.hooks import Hook


class LossCurve(Hook):
    """Keeps every loss term after each optimizer update (the trainer calls on_step_end)."""

    def __init__(self):
        self.steps, self.terms = [], {}

    def on_step_end(self, trainer, losses):
        self.steps.append(trainer.global_step)
        for name, value in losses.items():
            self.terms.setdefault(name, []).append(float(value.detach()))


BATCH = 8 if QUICK else 16
EPOCHS, STEPS_PER_EPOCH = (5, 20) if QUICK else (30, 200)
train_loader = create_dataloader(None, {"batch_size": BATCH, "seed": 0}, "train", simulation_config=sim_config)
val_loader = create_dataloader(None, {"batch_size": 16, "seed": 0, "val_samples": 32 if QUICK else 512}, "val",
                               simulation_config=sim_config)
curve = LossCurve()
trainer = BaseTrainer(model, loss_fn, optimizer_config={"type": "AdamW", "lr": 3e-3 if QUICK else 1e-3},
                      scheduler_config=None if QUICK else {"type": "StepLR", "step_size": 10, "gamma": 0.5},
                      hooks=[curve], postprocessor=PostProcessor(threshold=0.3, px_size_nm=PX_SIZE),
                      simulation_config=sim_config, seed=0)
history = trainer.train(train_loader, val_loader, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH,
                        gradient_clip_val=1.0)
print(f"{history['global_step']} updates in {history['total_time']:.1f} s on {trainer.device}")'''),
    code('''\
from decode_accel.evaluation import print_report

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
ax1.plot(curve.steps, curve.terms["loss"], lw=0.8, label="train (each update)")
epoch_ends = [(e + 1) * STEPS_PER_EPOCH for e in range(len(history["val_loss"]))]
ax1.plot(epoch_ends, history["val_loss"], "o-", label="validation")
ax1.set(xlabel="optimizer update", ylabel="loss (nats per frame)", title="total loss")
ax1.legend()
for name in ("count_loss", "loc_loss", "bg_loss"):
    ax2.plot(curve.steps, curve.terms[name], lw=0.8, label=name)
ax2.set(xlabel="optimizer update", title="loss terms")
ax2.legend()
plt.show()
val = history["val_metrics"][-1]
print_report({"method": "greedy", **val})'''),
    md('''\
The count and localization terms are negative log-likelihoods (nats): their values have no meaning of
their own (they can even go below zero as the network gets surer and more precise); what matters is that
they fall. In QUICK mode the network has trained for seconds: it finds a good part of the molecules but is
far from converged. With QUICK = False it trains for 6000 updates (tens of minutes on a CPU, a few on a
GPU); JI and RMSE keep improving for thousands of updates, so watch the validation curve flatten.

## 5 · Export

`trainer.export(folder)` writes a self-contained model folder: the weights (`model.safetensors`), the
network's constructor arguments (`config.json`), `decode_accel.json` with the pixel size, camera, PSF and
the full simulation config, and a model card (`README.md`). That is all `predict` needs to analyse a movie
recorded with the same microscope, and it can be pushed to the Hugging Face Hub as it is.'''),
    code('''\
import json

from decode_accel.hub import load_exported

export_dir = trainer.export(OUT / "01_single_channel_model")
print(sorted(p.name for p in export_dir.iterdir()))
exported = load_exported(export_dir)
print(f"pixel size {exported.px_size_nm} nm, {exported.n_channels} channel(s), frames {exported.frame_size}")

summary = {"first_loss": curve.terms["loss"][0], "last_loss": curve.terms["loss"][-1],
           "updates": history["global_step"], "jaccard": val.get("jaccard"), "rmse_lat_nm": val.get("rmse_lat"),
           "export_dir": str(export_dir)}
(OUT / "01_summary.json").write_text(json.dumps(summary, indent=2))
summary'''),
]

# --------------------------------------------------------------------------------------------------
# 02: two-channel ratiometric
# --------------------------------------------------------------------------------------------------

NB02 = [
    md('''\
# 02 · Two-channel ratiometric imaging: two dyes told apart by their photon ratio

In ratiometric multi-colour SMLM a dichroic splits each molecule's emission onto two camera channels
(or two halves of one camera). All dyes are excited together; a dye is recognised by the **fraction
r of its photons that lands in channel 1**. Here dye A sends r = 0.25 of its photons to channel 1 and
dye B r = 0.75. A molecule has one position (x, y, z) and one total photon number N; channel 1 gets r·N
photons and channel 2 (1 - r)·N, each on its own background.

`DoubleMUNet` predicts exactly these quantities per pixel (detection probability, position, N and r, each
with an uncertainty), so the two channels cannot disagree about a molecule. `UnifiedLoss` scores the
per-channel photons, the ratio, photon conservation and the consistency of the uncertainties, and
`MultiChannelTrainer` trains it. Finally each localization gets a **colour** from the dye table: the dye
whose ratio distribution best explains its measured r, and we measure the **crosstalk** (the fraction of
molecules given the wrong dye).

''' + UNITS_MD + '''
* `ratio` is the fraction of photons in channel 1 (0-1); `color` is the index of the assigned dye in the
  dye table (-1 = not assigned).'''),
    code(PARAMETERS),
    md('''\
## 1 · Simulate the two-channel microscope

The dye table lists each dye's mean ratio, its spread between molecules (`ratio_sd`) and its relative
abundance. Each channel has its own background range. Both channels are perfectly registered here; a
2x3 `affine` matrix in `channels` would map channel-1 pixel coordinates to channel 2.'''),
    code('''\
import matplotlib.pyplot as plt
import numpy as np

from decode_accel.simulation import SimulationConfig, Simulator

PX_SIZE, PSF_SIGMA_NM = 100.0, 130.0        # nm
FRAME = 24 if QUICK else 40                  # px
PHOTONS = (4000.0, 1000.0)                   # total photons (both channels) per molecule and frame
BACKGROUND = (20.0, 60.0)                    # photons/px, each channel
DYES = [dict(ratio_mean=0.25, ratio_sd=0.02, probability=1.0),   # dye A
        dict(ratio_mean=0.75, ratio_sd=0.02, probability=1.0)]   # dye B

sim_config = SimulationConfig.model_validate(dict(
    frame=dict(height=FRAME, width=FRAME, px_size=PX_SIZE),
    emitters=dict(density=0.5 if QUICK else 1.0, photons_mean=PHOTONS[0], photons_sd=PHOTONS[1],
                  z_range=(0.0, 0.0)),
    psf=dict(kind="gaussian", sigma=PSF_SIGMA_NM / PX_SIZE),
    camera=dict(preset="challenge2016"),
    channels=dict(n_channels=2, dyes=DYES, background=[BACKGROUND, BACKGROUND]),
    seed=2,
))
simulator = Simulator(sim_config)

movie = simulator.sample(2, torch.Generator().manual_seed(0))
on = movie.emitters[movie.emitters["frame"] == 0]
extent = (0, FRAME * PX_SIZE, FRAME * PX_SIZE, 0)
fig, axes = plt.subplots(1, 2, figsize=(10, 5), layout="constrained")
for c, ax in enumerate(axes):
    ax.imshow(movie.frames_photons[0, c].numpy(), cmap="gray", extent=extent)
    for dye, colour in ((0, "cyan"), (1, "magenta")):
        sel = on[on["color"] == dye]
        ax.scatter(sel["x"], sel["y"], s=90, facecolors="none", edgecolors=colour,
                   label=f"dye {'AB'[dye]} (r = {DYES[dye]['ratio_mean']})")
    ax.set(title=f"channel {c + 1} (photons)", xlabel="x (nm)", ylabel="y (nm)")
fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2)
plt.show()
on[["x", "y", "photons", "ratio", "photons_ch1", "photons_ch2", "color"]]'''),
    md('''\
Dye A (r = 0.25) is dim in channel 1 and bright in channel 2; dye B the other way round.

**What precision can the ratio have?** The Cramér-Rao lower bound (CRLB) is the smallest standard deviation
any unbiased estimator can reach from the photons alone. `crlb_ratio` computes it for two channels
(the EMCCD's excess noise doubles the variance). With the dyes 0.5 apart and a CRLB of a few hundredths,
an ideal estimator would almost never confuse them; dim molecules and a young network will.'''),
    code('''\
from decode_accel.evaluation import crlb_ratio

bound = crlb_ratio(photons=PHOTONS[0], ratio=0.25, bg_ch1=np.mean(BACKGROUND), bg_ch2=np.mean(BACKGROUND),
                   sigma_nm=PSF_SIGMA_NM, px_size_nm=PX_SIZE, camera="emccd")
RATIO_CRLB = float(bound["ratio"])
print(f"CRLB of r at N = {PHOTONS[0]:.0f} photons, r = 0.25: {RATIO_CRLB:.3f}; "
      f"lateral CRLB {float(bound['x']):.1f} nm")'''),
    md('''\
## 2 · DoubleMUNet + UnifiedLoss, trained with MultiChannelTrainer

`create_multi_channel_dataloader` is the two-channel loader: it checks that the data has two channels.
Stage 1 of the network analyses every channel of every frame with shared weights; stage 2 sees all six
feature maps and decides about molecules. The trainer's `dye_table` makes validation report the crosstalk.'''),
    code('''\
from decode_accel.data import create_multi_channel_dataloader
from decode_accel.inference.postprocess import PostProcessor
from decode_accel.loss import UnifiedLoss
from decode_accel.models import DoubleMUNet, Scaling
from decode_accel.training import MultiChannelTrainer
from decode_accel.training.hooks import Hook

# the dye table of the colour assignment (PostProcessor / evaluate spelling: ratio, ratio_sd, prob)
DYE_TABLE = [dict(name="A", ratio=0.25, ratio_sd=0.02, prob=1.0), dict(name="B", ratio=0.75, ratio_sd=0.02, prob=1.0)]

scaling = Scaling.auto(photons_mean=PHOTONS[0], photons_sd=PHOTONS[1], z_extent_nm=0.0, bg_max=BACKGROUND)
model = DoubleMUNet(in_channels=1, out_channels_ch1=5, out_channels_ch2=5, out_channels_ratio=1, uncertainty=True,
                    features=8 if QUICK else 16, z_enabled=False, scaling=scaling)
loss_fn = UnifiedLoss(ch1_weight=1.0, ch2_weight=1.0, ratio_weight=0.5, conservation_weight=0.1,
                      uncertainty_weight=0.1, scaling=scaling, z_enabled=False)


class LossCurve(Hook):
    """Keeps every loss term after each optimizer update."""

    def __init__(self):
        self.steps, self.terms = [], {}

    def on_step_end(self, trainer, losses):
        self.steps.append(trainer.global_step)
        for name, value in losses.items():
            self.terms.setdefault(name, []).append(float(value.detach()))


BATCH = 8 if QUICK else 16
EPOCHS, STEPS_PER_EPOCH = (4, 40) if QUICK else (30, 200)
train_loader = create_multi_channel_dataloader(None, {"batch_size": BATCH, "seed": 0}, "train",
                                               simulation_config=sim_config)
val_loader = create_multi_channel_dataloader(None, {"batch_size": 16, "seed": 0, "val_samples": 32 if QUICK else 512},
                                             "val", simulation_config=sim_config)
curve = LossCurve()
trainer = MultiChannelTrainer(model, loss_fn, optimizer_config={"type": "AdamW", "lr": 3e-3 if QUICK else 1e-3},
                              hooks=[curve], postprocessor=PostProcessor(threshold=0.3, px_size_nm=PX_SIZE,
                                                                         dye_table=DYE_TABLE),
                              dye_table=DYE_TABLE, simulation_config=sim_config, seed=0)
history = trainer.train(train_loader, val_loader, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH,
                        gradient_clip_val=1.0)
print(f"{history['global_step']} updates in {history['total_time']:.1f} s")

fig, ax = plt.subplots(figsize=(8, 4))
for name in ("loss", "count_loss", "ch1_loss", "ch2_loss", "ratio_loss"):
    ax.plot(curve.steps, curve.terms[name], lw=0.8, label=name)
ax.set(xlabel="optimizer update", ylabel="nats", title="UnifiedLoss terms (training)")
ax.legend()
plt.show()'''),
    md('''\
## 3 · Colour assignment on a held-out movie

We export the model (the export folder carries the dye table), simulate a movie the network has never seen
(its own seed), run `predict` on the camera ADU, and compare with the truth. `evaluate` matches
localizations to true molecules frame by frame (SMLM Challenge rules: closest first, within 250 nm) and,
given the dye table, reports the crosstalk: among matched molecules that got a colour, the fraction that got
the wrong one.'''),
    code('''\
from decode_accel.evaluation import evaluate, match_localizations, print_report
from decode_accel.inference.predict import predict

export_dir = trainer.export(OUT / "02_two_channel_model")
test_sim = Simulator(sim_config.model_copy(update={"seed": 12345}))
test_movie = test_sim.sample(30 if QUICK else 500, torch.Generator().manual_seed(12345))
truth = test_movie.labels                      # molecules bright enough to be labels (nm, with ratio and color)
table = predict(export_dir, test_movie.frames_adu.numpy(), progress=False)
print(f"{len(truth)} true molecule-frames, {len(table)} localizations; columns: {list(table.columns)}")
metrics = evaluate(truth, table, dye_table=DYE_TABLE)
print_report(metrics)'''),
    md('''\
The ratio histogram of the matched localizations, split by the dye each molecule truly is, shows why the
colours get mixed up (or not): two well-separated peaks at 0.25 and 0.75 mean little crosstalk. The dashed
curves are what an ideal estimator would give (the dyes' own spread combined with the CRLB at the mean
photon number; dimmer molecules spread wider).'''),
    code('''\
import json

gi, pi = match_localizations(truth, table)
true_dye = truth["color"].to_numpy()[gi]
measured_ratio = table["ratio"].to_numpy()[pi]
bins = np.linspace(0, 1, 41)
fig, ax = plt.subplots(figsize=(8, 4))
r = np.linspace(0, 1, 400)
for dye, colour in ((0, "tab:cyan"), (1, "tab:purple")):
    values = measured_ratio[true_dye == dye]
    ax.hist(values, bins=bins, alpha=0.6, color=colour, label=f"true dye {DYE_TABLE[dye]['name']} ({len(values)})")
    sd = np.hypot(DYE_TABLE[dye]["ratio_sd"], RATIO_CRLB)
    ideal = len(values) * (bins[1] - bins[0]) * np.exp(-0.5 * ((r - DYE_TABLE[dye]["ratio"]) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
    ax.plot(r, ideal, "--", color=colour)
ax.set(xlabel="measured ratio r (fraction of photons in channel 1)", ylabel="localizations",
       title=f"crosstalk {100 * metrics.get('crosstalk', float('nan')):.1f} %")
ax.legend()
plt.show()

from decode_accel.io import write_table

write_table(table, OUT / "02_localizations.csv")   # ThunderSTORM CSV with ratio and color columns
write_table(truth, OUT / "02_truth.csv")
summary = {"n_gt": metrics["n_gt"], "n_pred": metrics["n_pred"], "tp": metrics["tp"],
           "crosstalk": metrics.get("crosstalk"), "ratio_rmse": metrics.get("ratio_rmse"),
           "ratio_crlb": RATIO_CRLB, "export_dir": str(export_dir)}
(OUT / "02_summary.json").write_text(json.dumps(summary, indent=2, default=float))
summary'''),
    md('''\
In QUICK mode the network has trained for seconds, so the ratio peaks are broad and the crosstalk is high.
Train with QUICK = False (or on a GPU with `features=48`) to approach the CRLB; real data also need the
channel registration (`affine`) and per-channel backgrounds of your microscope in the simulation.'''),
]

# --------------------------------------------------------------------------------------------------
# 03: inference on a movie
# --------------------------------------------------------------------------------------------------

NB03 = [
    md('''\
# 03 · Localize the molecules of a movie

This notebook is what you do with a trained model and a recorded movie: `predict` reads the TIFF stack (in
camera ADU, memory-mapped, tiled when frames are large), converts it to photons with the camera model stored
in the export folder, runs the network on every 3-frame window and post-processes its maps into a table of
localizations. To know the truth we analyse a **simulated** movie, with its own seed so the network has never
seen it. Then we look at the detections, render a super-resolution image and compare the achieved precision
with the **Cramér-Rao lower bound** (CRLB), the best precision any method can reach from these photons.

''' + UNITS_MD),
    code(PARAMETERS),
    md('''\
## 1 · The model

Notebook 01 exports its model to `outputs/01_single_channel_model`. If it is not there, this cell trains a
tiny one in the same way (a minute on a CPU), so this notebook also runs on its own.'''),
    code('''\
from decode_accel.hub import load_exported

model_dir = OUT / "01_single_channel_model"
if not (model_dir / "decode_accel.json").is_file():
    from decode_accel.data import create_dataloader
    from decode_accel.loss import GaussianMMLoss
    from decode_accel.models import Scaling, SigmaMUNet
    from decode_accel.simulation import SimulationConfig
    from decode_accel.training import BaseTrainer

    print("no export from notebook 01: training a small model here")
    sim_config = SimulationConfig.model_validate(dict(
        frame=dict(height=32, width=32, px_size=100.0),
        emitters=dict(density=0.5, photons_mean=3000.0, photons_sd=1000.0, z_range=(0.0, 0.0), on_time_mean=1.5),
        psf=dict(kind="gaussian", sigma=1.3), background=dict(uniform=(20.0, 60.0)),
        camera=dict(preset="challenge2016"), seed=1))
    scaling = Scaling.auto(3000.0, 1000.0, 0.0, (20.0, 60.0))
    net = SigmaMUNet(features=8, z_enabled=False, scaling=scaling)
    trainer = BaseTrainer(net, GaussianMMLoss(scaling=scaling, z_enabled=False),
                          optimizer_config={"type": "AdamW", "lr": 3e-3}, simulation_config=sim_config, seed=0)
    trainer.train(create_dataloader(None, {"batch_size": 8}, "train", simulation_config=sim_config),
                  epochs=1, steps_per_epoch=100 if QUICK else 2000, export_dir=model_dir)

exported = load_exported(model_dir)
train_sim = exported.simulation_config
PX_SIZE = exported.px_size_nm
PSF_SIGMA_NM = train_sim.psf.sigma * PX_SIZE
print(f"model from {model_dir}: pixel {PX_SIZE} nm, PSF sigma {PSF_SIGMA_NM:.0f} nm, camera {train_sim.camera.kind}")'''),
    md('''\
## 2 · A held-out movie, written as a TIFF

Same microscope as in training (that is the model's contract), a new seed and a larger field of view:
the network is fully convolutional, so movies can be larger than the training frames. The camera gives
16-bit ADU, so that is what we write.'''),
    code('''\
import numpy as np
import tifffile

from decode_accel.simulation import Simulator

N_FRAMES, SIDE = (40, 48) if QUICK else (1000, 64)
movie_sim = Simulator(train_sim.model_copy(update={
    "seed": 2024, "frame": train_sim.frame.model_copy(update={"height": SIDE, "width": SIDE})}))
movie = movie_sim.sample(N_FRAMES, torch.Generator().manual_seed(2024))
tif_path = OUT / "03_movie.tif"
tifffile.imwrite(tif_path, movie.frames_adu[:, 0].numpy().astype(np.uint16))
truth = movie.labels
print(f"{tif_path}: {N_FRAMES} frames of {SIDE}x{SIDE} px, {len(truth)} true molecule-frames")'''),
    md('''\
## 3 · `predict`

`predict(model_folder, movie)` returns the table and, with `out=`, writes it as a ThunderSTORM CSV
(x, y in nm, 1-based frames) and/or a Picasso HDF5 file (with its YAML sidecar), which Picasso Render and
napari open directly. Each row has the detection probability `prob` and the network's own 1-σ uncertainties
`x_sigma`, `y_sigma` (nm).'''),
    code('''\
from decode_accel.inference.predict import predict

csv_path = OUT / "03_localizations.csv"
table = predict(model_dir, tif_path, out=csv_path, progress=False)
print(f"{len(table)} localizations written to {csv_path}")
table.head()'''),
    code('''\
import matplotlib.pyplot as plt

extent = (0, SIDE * PX_SIZE, SIDE * PX_SIZE, 0)
fig, axes = plt.subplots(1, 3, figsize=(14, 5), layout="constrained")
for t, ax in enumerate(axes):
    ax.imshow(movie.frames_adu[t, 0].numpy(), cmap="gray", extent=extent)
    gt_t, loc_t = truth[truth["frame"] == t], table[table["frame"] == t]
    ax.scatter(gt_t["x"], gt_t["y"], s=90, facecolors="none", edgecolors="lime", label="truth")
    ax.scatter(loc_t["x"], loc_t["y"], s=40, marker="x", color="red", label="localization")
    ax.set(title=f"frame {t}", xlabel="x (nm)", ylabel="y (nm)")
fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2)
plt.show()'''),
    md('''\
## 4 · How good is it?

`evaluate` applies the SMLM Challenge 2016 rules: per frame, true molecules and localizations are paired
closest first within 250 nm; JI = TP / (TP + FP + FN); RMSE is the radial lateral error of the pairs (nm).
Given the PSF and camera it also computes the CRLB of every matched true molecule (from its photons and
the frame's background) and reports RMSE / CRLB: 1 would be a perfect estimator.'''),
    code('''\
from decode_accel.evaluation import GaussianPSF, evaluate, print_report

bg_per_frame = movie.bg.mean(dim=(1, 2, 3)).numpy()     # the simulated background is uniform per frame
metrics = evaluate(truth, table, psf=GaussianPSF(sigma_nm=PSF_SIGMA_NM), px_size_nm=PX_SIZE,
                   camera="emccd", default_bg=bg_per_frame)
print_report(metrics)'''),
    md('''\
## 5 · Super-resolution image

`render` draws every localization as a Gaussian blob whose width is the localization's own uncertainty
(or a fixed `sigma_nm`), on a grid much finer than the camera's (here 10 nm pixels). Next to it the
same rendering of the truth, and the sum of all camera frames (the diffraction-limited image).'''),
    code('''\
from decode_accel.inference.render import render

RENDER_PX = 10.0   # nm
size = dict(width_nm=SIDE * PX_SIZE, height_nm=SIDE * PX_SIZE)
sr = render(table, px_size_nm=RENDER_PX, out=OUT / "03_render.png", **size)
sr_truth = render(truth, px_size_nm=RENDER_PX, sigma_nm=10.0, **size)
fig, axes = plt.subplots(1, 3, figsize=(15, 5))
axes[0].imshow(movie.frames_photons[:, 0].sum(0).numpy(), cmap="gray", extent=extent)
axes[0].set_title("sum of all frames (diffraction limited)")
for ax, img, title in ((axes[1], sr, "decode_accel localizations"), (axes[2], sr_truth, "ground truth")):
    ax.imshow(img, cmap="hot", extent=extent, vmax=max(np.percentile(img, 99.5), 1e-6))
    ax.set_title(f"{title}, {RENDER_PX:.0f} nm pixels")
for ax in axes:
    ax.set(xlabel="x (nm)", ylabel="y (nm)")
plt.show()'''),
    md('''\
## 6 · Precision against the CRLB

For every matched pair we take the error in x and the CRLB of that molecule (Gaussian PSF, EMCCD excess
noise factor 2). If the network were an ideal estimator, error / CRLB would be a standard normal
distribution (dashed). The second panel asks whether the network knows its own precision: its predicted
`x_sigma` against the CRLB.'''),
    code('''\
import json

from decode_accel.evaluation import crlb_gaussian_2d, match_localizations

gi, pi = match_localizations(truth, table)
gt_m, loc_m = truth.iloc[gi], table.iloc[pi]
dx = loc_m["x"].to_numpy() - gt_m["x"].to_numpy()
if len(gi):
    crlb_x = crlb_gaussian_2d(gt_m["photons"].to_numpy(), bg_per_frame[gt_m["frame"].to_numpy()], PSF_SIGMA_NM,
                              PX_SIZE, x_nm=gt_m["x"].to_numpy(), y_nm=gt_m["y"].to_numpy(), camera="emccd")["x"]
else:
    crlb_x = np.zeros(0)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
z = np.linspace(-6, 6, 200)
# errors beyond 6 CRLB are piled into the outermost bins, so every pair is counted
ax1.hist(np.clip(dx / crlb_x, -6, 6), bins=np.linspace(-6, 6, 41), density=True, alpha=0.7, label="error x / CRLB x")
ax1.plot(z, np.exp(-z ** 2 / 2) / np.sqrt(2 * np.pi), "k--", label="ideal estimator")
ax1.set(xlabel="normalised error", ylabel="density", title=f"{len(gi)} matched localizations")
ax1.legend()
ax2.scatter(crlb_x, loc_m["x_sigma"], s=8)
lim = [0, max(float(np.max(crlb_x, initial=1.0)), float(loc_m["x_sigma"].max()) if len(gi) else 1.0) * 1.1]
ax2.plot(lim, lim, "k--", lw=0.8, label="x_sigma = CRLB")
ax2.set(xlabel="CRLB x (nm)", ylabel="predicted x_sigma (nm)", xlim=lim, ylim=lim)
ax2.legend()
plt.show()

summary = {"n_frames": N_FRAMES, "n_truth": len(truth), "n_localizations": len(table), "tp": metrics["tp"],
           "jaccard": metrics["jaccard"], "rmse_lat_nm": metrics.get("rmse_lat"),
           "crlb_x_rms_nm": float(np.sqrt(np.mean(crlb_x ** 2))) if len(gi) else None,
           "rmse_x_nm": float(np.sqrt(np.mean(dx ** 2))) if len(gi) else None}
(OUT / "03_summary.json").write_text(json.dumps(summary, indent=2, default=float))
summary'''),
    md('''\
With the quick model the errors are several times the CRLB; a well-trained network comes close to it
(the DECODE paper reports precision near the CRLB over a wide range of photon numbers). The same steps work on a real movie: `predict(model_dir,
"my_movie.tif", out="locs.csv")`, or from the shell `decode-accel predict`.'''),
]

# --------------------------------------------------------------------------------------------------
# 04: multi-process training
# --------------------------------------------------------------------------------------------------

NB04 = [
    md('''\
# 04 · Several processes from a notebook: `notebook_launcher`

Accelerate's `notebook_launcher(train_fn, num_processes=N)` starts N processes from inside a notebook, each
running `train_fn` (data-parallel training: every process trains on different data, the gradients are
averaged after every step, so all copies of the network stay identical). On GPUs each process gets one
GPU; here we use two CPU processes, which is how you test a multi-GPU script on a laptop.

**One pitfall on machines without a GPU:** the Accelerator inside `train_fn` must be created with
`cpu=True` (`BaseTrainer(..., cpu=True)`). Without it each of the N processes believes it is alone: you get N
unsynchronised copies of the same training and no speed-up, silently. Section 1 shows that, section 2 does
it right and checks that both processes end with identical parameters.

Rules for the function (they come from how the processes are started, by forking this kernel):
create the Accelerator (the trainer) **only inside** the function, never in the notebook before the launch;
and give every launch its own port (`use_port`).'''),
    code(PARAMETERS),
    md('''\
## 1 · Without `cpu=True`: two processes that do not know about each other

This function only creates an Accelerator and reports what it sees.'''),
    code('''\
import json

from accelerate import notebook_launcher


def report_state(out_dir, cpu):
    from accelerate import Accelerator

    acc = Accelerator(cpu=cpu)
    rank = int(os.environ.get("RANK", acc.process_index))   # the launcher's own process number
    (out_dir / f"04_state_cpu{int(cpu)}_rank{rank}.json").write_text(json.dumps(
        {"distributed_type": str(acc.distributed_type), "num_processes": acc.num_processes,
         "process_index": acc.process_index}))


if torch.cuda.is_available():
    # with GPUs the launcher does set up distributed training; two processes on one GPU would clash
    print("this machine has a GPU: the CPU pitfall does not apply here, skipping the demonstration")
else:
    notebook_launcher(report_state, args=(OUT, False), num_processes=2, use_port="29561")
    for rank in range(2):
        print(f"launched process {rank}:", json.loads((OUT / f"04_state_cpu0_rank{rank}.json").read_text()))'''),
    md('''\
Both processes say `num_processes: 1` and `process_index: 0`: each would train alone, on the same data.
(Accelerate's message "Launching training on 2 CUDAs" above is its own label; no GPU is involved.)

## 2 · With `cpu=True`: one training split over two processes

Inside `train_fn` each process builds the same model and a trainer with `cpu=True`. The simulated
training stream is told the process's rank and the number of processes, so the two processes simulate
**different** frames (the stream shards itself; it is deliberately not passed through `accelerator.prepare`).
A hook remembers a fingerprint of the first batch each process sees. At the end every process writes a
fingerprint of its parameters; only the main process exports the model.'''),
    code('''\
import hashlib


def train_fn(out_dir, quick):
    import torch

    from decode_accel.data import create_dataloader
    from decode_accel.loss import GaussianMMLoss
    from decode_accel.models import Scaling, SigmaMUNet
    from decode_accel.simulation import SimulationConfig
    from decode_accel.training import BaseTrainer
    from decode_accel.training.hooks import Hook

    torch.set_num_threads(1)          # two processes share the CPU cores
    sim_config = SimulationConfig.model_validate(dict(
        frame=dict(height=24 if quick else 40, width=24 if quick else 40, px_size=100.0),
        emitters=dict(density=0.5, photons_mean=3000.0, photons_sd=1000.0, z_range=(0.0, 0.0)),
        psf=dict(kind="gaussian", sigma=1.3), background=dict(uniform=(20.0, 60.0)),
        camera=dict(preset="challenge2016"), seed=4))
    scaling = Scaling.auto(3000.0, 1000.0, 0.0, (20.0, 60.0))
    model = SigmaMUNet(features=8 if quick else 16, z_enabled=False, scaling=scaling)

    class FirstBatch(Hook):
        digest = None

        def on_batch(self, trainer, batch):
            if self.digest is None:
                self.digest = hashlib.sha256(batch["frames"].cpu().numpy().tobytes()).hexdigest()[:16]
            return batch

    first = FirstBatch()
    trainer = BaseTrainer(model, GaussianMMLoss(scaling=scaling, z_enabled=False),
                          optimizer_config={"type": "AdamW", "lr": 3e-3}, cpu=True, hooks=[first],
                          simulation_config=sim_config, seed=0)
    acc = trainer.accelerator
    loader = create_dataloader(None, {"batch_size": 4}, "train", simulation_config=sim_config,
                               rank=acc.process_index, world_size=acc.num_processes)
    history = trainer.train(loader, epochs=2, steps_per_epoch=5 if quick else 500)
    params = torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])
    (out_dir / f"04_rank{acc.process_index}.json").write_text(json.dumps({
        "distributed_type": str(acc.distributed_type), "num_processes": acc.num_processes,
        "first_batch": first.digest, "samples_seen": trainer.stream_samples, "updates": trainer.global_step,
        "params_sha256": hashlib.sha256(params.numpy().tobytes()).hexdigest(),
        "train_loss": history["train_loss"]}))
    trainer.export(out_dir / "04_two_process_model")     # writes on the main process only


notebook_launcher(train_fn, args=(OUT, QUICK), num_processes=2, use_port="29562")'''),
    code('''\
ranks = [json.loads((OUT / f"04_rank{r}.json").read_text()) for r in range(2)]
for r, info in enumerate(ranks):
    print(f"rank {r}: {info['distributed_type']}, {info['num_processes']} processes, first batch {info['first_batch']}, "
          f"{info['samples_seen']} samples, {info['updates']} updates, params {info['params_sha256'][:16]}")
assert ranks[0]["first_batch"] != ranks[1]["first_batch"], "both processes trained on the same frames"
assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"], "the two copies of the network diverged"
print("different data on each process, bit-identical parameters at the end: the gradients were averaged")'''),
    md('''\
Each process saw its own frames, yet the parameters are bit-identical: after every step the gradients were
averaged over the processes (DDP over gloo on CPU), so each update used twice the batch. The logged training
loss is also averaged over both processes, so every process reports the same history.

On a GPU machine drop `cpu=True` and set `num_processes` to the number of GPUs; from a terminal use
`accelerate launch` with one of the configs in `accelerate_configs/` and the scripts in `recipes/`.'''),
]

NOTEBOOKS = {
    "01_train_single_channel.ipynb": NB01,
    "02_two_channel_ratiometric.ipynb": NB02,
    "03_inference_on_a_movie.ipynb": NB03,
    "04_multi_process_training.ipynb": NB04,
}


def build(cells: list) -> nbformat.NotebookNode:
    """A notebook (no outputs) for the venv's Python 3 kernel."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.from_dict(dict(c)) for c in cells]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"   # stable ids keep the regenerated files byte-identical
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    }
    return nb


def render_all() -> dict[str, str]:
    """File name -> notebook JSON text, as written to disk."""
    return {name: nbformat.writes(build(cells)) + "\n" for name, cells in NOTEBOOKS.items()}


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0]) if argv else HERE
    for name, text in render_all().items():
        (out_dir / name).write_text(text, encoding="utf-8")
        print(f"wrote {out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
