"""Knowledge distillation for SMLM output maps: a small student learns a large teacher's per-pixel maps.

A classification-style softmax over classes does not fit these outputs. Every pixel instead carries
a Bernoulli detection (p) and diagonal Gaussians over photons, x, y, z (and, two-channel, the
per-channel photons and the ratio). So the student is taught with:
- ``distill_p_loss``: the Bernoulli KL divergence KL(teacher || student) of the detection at
  temperature T, from logits, times T^2 (Hinton's scaling, so gradients keep their size as T changes).
  It equals the BCE between the student's logits and the teacher's soft probabilities minus the
  teacher's own entropy (a constant), so it has the BCE's gradients and is exactly 0 when
  student == teacher. Summed over the pixels of a frame (the KL of the whole detection map),
  averaged over frames.
- ``distill_gauss_loss``: the KL divergence KL(N_teacher || N_student) of each pixel's Gaussian per dim,
  summed over the dims both outputs have, averaged over pixels with the teacher's p as weights
  (pixels where the teacher sees no emitter say nothing about positions). The KL between Gaussians
  does not change under a common affine map, so no photon or z normalisation is needed.
The blend with the ground-truth loss is ``loss = alpha * distill_loss + (1 - alpha) * gt_loss``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from decode_accel.errors import DecodeAccelError
from decode_accel.loss.base import SIGMA_FLOOR, WeightedLoss, as_float32, check_weight

#: (mean key, sigma key) pairs of the output dict distilled by the Gaussian term, when present in both.
GAUSSIAN_KEYS = (("photons", "photons_sigma"), ("dx", "dx_sigma"), ("dy", "dy_sigma"), ("z", "z_sigma"),
                 ("photons_ch1", "photons_ch1_sigma"), ("photons_ch2", "photons_ch2_sigma"),
                 ("ratio", "ratio_sigma"))

# p of exactly 0 or 1 (no logits given) is mapped to these logits; the models clamp at +-8.
LOGIT_LIMIT = 16.0


def detection_logits(output: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The detection logits of an output dict: ``logits`` if given, else logit(p) (clamped)."""
    if "logits" in output:
        return as_float32(output["logits"])
    if "p" not in output:
        raise DecodeAccelError("distillation: the output dict has neither 'logits' nor 'p'", field="output",
                               fix="distil models that return the map dict of docs/architecture.md")
    return torch.logit(as_float32(output["p"])).clamp(-LOGIT_LIMIT, LOGIT_LIMIT)


def bernoulli_kl_with_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             temperature: float = 1.0) -> torch.Tensor:
    """Elementwise KL(Bernoulli(sigmoid(t / T)) || Bernoulli(sigmoid(s / T))) in nats, >= 0, 0 iff s == t."""
    s = student_logits / temperature
    t = teacher_logits.detach() / temperature
    q = torch.sigmoid(t)
    # BCE(s; q) - BCE(t; q) = KL; both computed stably from logits.
    return (F.binary_cross_entropy_with_logits(s, q, reduction="none")
            - F.binary_cross_entropy_with_logits(t, q, reduction="none"))


def gaussian_kl(teacher_mean: torch.Tensor, teacher_sigma: torch.Tensor, student_mean: torch.Tensor,
                student_sigma: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mu_t, sigma_t^2) || N(mu_s, sigma_s^2)) in nats (sigmas lifted to a tiny floor)."""
    sigma_t = teacher_sigma.clamp_min(SIGMA_FLOOR)
    sigma_s = student_sigma.clamp_min(SIGMA_FLOOR)
    ratio = sigma_t / sigma_s
    return (torch.log(sigma_s) - torch.log(sigma_t)
            + 0.5 * (ratio * ratio + ((teacher_mean - student_mean) / sigma_s) ** 2) - 0.5)


class DistillationLoss(WeightedLoss):
    """Distil a teacher's output maps into a student, optionally blended with the ground-truth loss.

    Call ``distill(student_output, teacher_output, batch=None, gt_terms=None)``. The teacher output is
    detached. Returned terms: ``distill_p_loss``, ``distill_gauss_loss`` (see the module docstring),
    ``distill_loss`` = detection_weight * distill_p_loss + gaussian_weight * distill_gauss_loss, and
    ``loss``. With ground truth (``gt_terms`` = the dict of a loss already evaluated on the student, or
    ``batch`` together with a ``gt_loss``), the ground-truth terms are included by name, ``gt_loss`` is
    their total and ``loss = alpha * distill_loss + (1 - alpha) * gt_loss``; without it,
    ``loss = distill_loss``.

    Args:
        gt_loss: the ground-truth loss (e.g. ``GaussianMMLoss``) evaluated on the student when ``batch``
            is given.
        alpha: share of the distillation loss in [0, 1] (the seed's DistillationTrainer uses 0.7).
        temperature: T > 0 for the detection term (1 = the teacher's probabilities as they are).
        detection_weight, gaussian_weight: weights (>= 0) of the two distillation terms.
        keys: (mean, sigma) key pairs for the Gaussian term; default ``GAUSSIAN_KEYS`` (those present in
            both outputs are used).

    ``update_weights`` accepts alpha, detection_weight and gaussian_weight, and passes other names on
    to ``gt_loss``.
    """

    term_weights = {"distill_p_loss": "detection_weight", "distill_gauss_loss": "gaussian_weight"}

    def __init__(self, gt_loss: WeightedLoss | None = None, *, alpha: float = 0.7, temperature: float = 1.0,
                 detection_weight: float = 1.0, gaussian_weight: float = 1.0,
                 keys: tuple[tuple[str, str], ...] = GAUSSIAN_KEYS):
        super().__init__(alpha=self._check_alpha(alpha), detection_weight=detection_weight,
                         gaussian_weight=gaussian_weight)
        self.gt_loss = gt_loss
        temperature = check_weight("DistillationLoss", "temperature", temperature)
        if temperature <= 0:
            raise DecodeAccelError("DistillationLoss: temperature must be > 0", field="temperature",
                                   fix="use 1.0 for no softening")
        self.temperature = temperature
        self.keys = tuple(keys)

    @staticmethod
    def _check_alpha(alpha: Any) -> float:
        value = check_weight("DistillationLoss", "alpha", alpha)
        if value > 1:
            raise DecodeAccelError(f"DistillationLoss: alpha={value} must be in [0, 1]", field="alpha",
                                   fix="alpha is the share of the distillation loss, e.g. 0.7")
        return value

    def update_weights(self, **weights: float) -> None:
        own = {self.weight_name(name): value for name, value in weights.items() if self.weight_name(name)}
        passed_on = {name: value for name, value in weights.items() if not self.weight_name(name)}
        if passed_on:
            if self.gt_loss is None:
                super().update_weights(**passed_on)  # raises the unknown-name error
            self.gt_loss.update_weights(**passed_on)
        if "alpha" in own:
            own["alpha"] = self._check_alpha(own["alpha"])
        super().update_weights(**own)

    def distillation_terms(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]
                           ) -> dict[str, torch.Tensor]:
        """distill_p_loss and distill_gauss_loss (unweighted)."""
        student_logits = detection_logits(student)
        teacher_logits = detection_logits(teacher).detach()
        if student_logits.shape != teacher_logits.shape:
            raise DecodeAccelError(f"DistillationLoss: student maps {tuple(student_logits.shape)} and teacher maps "
                                   f"{tuple(teacher_logits.shape)} differ", field="teacher",
                                   fix="run the teacher on the same frames as the student")
        kl_p = bernoulli_kl_with_logits(student_logits, teacher_logits, self.temperature)
        # Summed over the pixels of a frame (the KL of the whole detection map, whose pixels are independent
        # Bernoullis), averaged over frames: a mean over pixels would drown the few detections in the
        # empty background and make the term ~1000x smaller than the per-detection Gaussian term.
        terms = {"distill_p_loss": kl_p.flatten(1).sum(1).mean() * self.temperature ** 2}

        weights = torch.sigmoid(teacher_logits)
        gauss = torch.zeros_like(weights)
        for mean_key, sigma_key in self.keys:
            if all(key in student and key in teacher for key in (mean_key, sigma_key)):
                gauss = gauss + gaussian_kl(as_float32(teacher[mean_key]).detach(),
                                            as_float32(teacher[sigma_key]).detach(),
                                            as_float32(student[mean_key]), as_float32(student[sigma_key]))
        terms["distill_gauss_loss"] = (weights * gauss).sum() / weights.sum().clamp_min(1e-12)
        return terms

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                batch: Mapping[str, torch.Tensor] | None = None,
                gt_terms: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Terms by name plus ``"loss"`` (see the class docstring)."""
        if gt_terms is None and batch is not None:
            if self.gt_loss is None:
                raise DecodeAccelError("DistillationLoss: a batch was given but no gt_loss", field="gt_loss",
                                       fix="pass gt_loss=GaussianMMLoss(...) or gt_terms=loss_fn(student, batch)")
            gt_terms = self.gt_loss(student, batch)
        terms = self.distillation_terms(student, teacher)
        distill = self.weighted_total(terms)
        result: dict[str, torch.Tensor] = {}
        if gt_terms is not None:
            result.update({name: value for name, value in gt_terms.items() if name != "loss"})
            result["gt_loss"] = gt_terms["loss"]
        result.update(terms)
        result["distill_loss"] = distill
        if gt_terms is not None:
            alpha = self._weights["alpha"]
            result["loss"] = alpha * distill + (1.0 - alpha) * gt_terms["loss"]
        else:
            result["loss"] = distill
        return result

    def distill(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                batch: Mapping[str, torch.Tensor] | None = None,
                gt_terms: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The same as calling the loss; reads better at call sites in hooks."""
        return self(student, teacher, batch=batch, gt_terms=gt_terms)
