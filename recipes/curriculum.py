"""Curriculum training: simulation difficulty, learning rate and loss weights change by stage.

recipes/configs/curriculum.yaml starts with sparse, bright emitters and ends at the target density; the
stages reach the DataLoader workers through the stream's deterministic difficulty schedule. Launched like
the single-channel recipe: ``python recipes/curriculum.py --cpu model.preset=tiny training_strategy.epochs=3``.
"""

from decode_accel.cli import recipe_main

if __name__ == "__main__":
    recipe_main("curriculum", description=__doc__.splitlines()[0])
