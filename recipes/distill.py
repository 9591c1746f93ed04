"""Knowledge distillation: a small student learns from a trained teacher (--teacher EXPORT_DIR).

Launch (no data files needed; the frames are simulated on the fly)::

    python recipes/distill.py [--config FILE.yaml] [key=value ...] [--cpu] [--resume] [--output_dir DIR]
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/distill.py ...
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/distill.py ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/distill.py --cpu ...

The default config is recipes/configs/distill.yaml; everything is built by
decode_accel.cli.run_from_cli (shared by all recipes).
"""

import sys

from decode_accel.errors import DecodeAccelError
from decode_accel.cli import run_from_cli

if __name__ == "__main__":
    try:
        run_from_cli(sys.argv[1:], default_config="distill", description=__doc__.splitlines()[0],
                     require_teacher=True)
    except DecodeAccelError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
