"""Knowledge distillation: a small student learns from a trained teacher (--teacher EXPORT_DIR).

The student (recipes/configs/distill.yaml: cpu_small) learns from the teacher's output maps (alpha 0.7)
and from the ground truth (0.3). ``accelerate launch recipes/distill.py --teacher runs/sc/export``; without
a teacher it stops with a one-line error.
"""

from decode_accel.cli import recipe_main

if __name__ == "__main__":
    recipe_main("distill", description=__doc__.splitlines()[0], require_teacher=True)
