"""Curriculum training: simulation difficulty, learning rate and loss weights change by stage.

Launch (no data files needed; the frames are simulated on the fly)::

    python recipes/curriculum.py [--config FILE.yaml] [key=value ...] [--cpu] [--resume] [--output_dir DIR]
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/curriculum.py ...
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/curriculum.py ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/curriculum.py --cpu ...

The default config is recipes/configs/curriculum.yaml; everything is built by
decode_accel.cli.run_from_cli (shared by all recipes).
"""

import sys

from decode_accel.errors import DecodeAccelError
from decode_accel.cli import run_from_cli

if __name__ == "__main__":
    try:
        run_from_cli(sys.argv[1:], default_config="curriculum", description=__doc__.splitlines()[0])
    except DecodeAccelError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
