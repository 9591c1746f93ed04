"""decode_accel: deep-learning single-molecule localization microscopy, trained with Hugging Face Accelerate.

The package layout follows the data flow: ``simulation`` -> ``data`` -> ``models`` -> ``loss`` ->
``training`` -> ``inference`` -> ``evaluation`` (+ ``io`` for localization tables).
See docs/architecture.md for the contracts between these rooms.
"""

__version__ = "0.1.0"
