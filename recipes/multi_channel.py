"""Two-channel ratiometric training (DoubleMUNet + UnifiedLoss) on simulated frames.

Each emitter's photons split between two channels by its dye's ratio (recipes/configs/multi_channel.yaml);
the export carries the dye table, so predict assigns colours. Launched like the single-channel recipe:
``accelerate launch recipes/multi_channel.py --output_dir runs/mc [key=value ...]``.
"""

from decode_accel.cli import recipe_main

if __name__ == "__main__":
    recipe_main("multi_channel", description=__doc__.splitlines()[0])
