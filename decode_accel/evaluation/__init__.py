"""Evaluation: frame-wise matching to ground truth, SMLM Challenge 2016 metrics, CRLB."""

from decode_accel.evaluation.crlb import (AstigmaticPSF, GaussianPSF, crlb_astigmatic, crlb_for_table,
                                          crlb_gaussian_2d, crlb_ratio, mortensen_mle_sigma)
from decode_accel.evaluation.matching import match_frame, match_localizations
from decode_accel.evaluation.metrics import efficiency, evaluate, format_report, print_report

__all__ = ["evaluate", "format_report", "print_report", "efficiency", "match_frame",
           "match_localizations", "GaussianPSF", "AstigmaticPSF", "crlb_gaussian_2d", "crlb_astigmatic", "crlb_ratio",
           "crlb_for_table", "mortensen_mle_sigma"]
