"""Single-channel DECODE-style training (SigmaMUNet + GaussianMMLoss) on simulated frames.

The default config, recipes/configs/single_channel.yaml, simulates 40 x 40 px frames of an astigmatic 3D PSF
at 1 emitter/µm² on the fly (no data files). Run ``python recipes/single_channel.py [flags]`` or
``accelerate launch [launcher flags] recipes/single_channel.py [flags]`` (README, "Multi-process and GPU
training"; ``--help`` lists the flags); decode_accel.pipeline.train_model does the run.
"""

from decode_accel.cli import recipe_main

if __name__ == "__main__":
    recipe_main("single_channel", description=__doc__.splitlines()[0])
