"""Estimators of unit sensitivity from measured responses with repeats (Guo et al. 2022, sec. 3.1).

Measured responses ``r_i`` (recorded or simulated neurons, NaN for a missing repeat) are noisy, so the
plain mean of ``|r_i(x) - r_i(x + d)|`` is biased upwards; the sign-corrected estimator uses the signs of
the model ``f_i`` that made the perturbations and is biased towards zero instead::

    E_j |r_i(x_j) - r_i(x_j + d_ij)|  >=  1/M sum_j sign(f_i(x_j) - f_i(x_j + d_ij)) (r_i(x_j) - r_i(x_j + d_ij))
"""
from __future__ import annotations

import torch

from neuroguide.evaluation.metrics.statistics import sd


def repeat_mean(responses: torch.Tensor) -> torch.Tensor:
    """(M, K, R) responses with NaN for missing repeats -> (M, K) mean over repeats; (M, K) passes."""
    responses = torch.as_tensor(responses, dtype=torch.float32)
    return responses.nanmean(dim=-1) if responses.ndim == 3 else responses


def sign_corrected_sensitivity(pred_clean: torch.Tensor, pred_adv: torch.Tensor, resp_clean: torch.Tensor,
                               resp_adv: torch.Tensor) -> torch.Tensor:
    """Guo et al.'s sign-corrected estimate of ``E_j |r_i(x_j) - r_i(x_j + d_ij)|`` per unit.

    ``1/M sum_j sign(f_i(x_j) - f_i(x_j + d)) (r_i(x_j) - r_i(x_j + d))``: unbiased when the model
    ``f`` predicts every direction of change correctly, biased towards zero otherwise; noise in
    ``r`` averages out instead of adding a positive bias.

    Args:
        pred_clean, pred_adv: (M, K) model responses ``f_i`` to clean and perturbed images.
        resp_clean, resp_adv: (M, K) or (M, K, R) measured responses (NaN = missing repeat).
    Returns:
        (K,) estimate per unit (NaN-aware mean over images).
    """
    sign = torch.sign(torch.as_tensor(pred_clean) - torch.as_tensor(pred_adv)).float()
    dr = repeat_mean(resp_clean) - repeat_mean(resp_adv)
    _check_same(sign, dr, "pred", "resp")
    return (sign * dr).nanmean(dim=0)


def naive_sensitivity(resp_clean: torch.Tensor, resp_adv: torch.Tensor) -> torch.Tensor:
    """``1/M sum_j |r_i(x_j) - r_i(x_j + d)|`` per unit (K,): positively biased under noise."""
    return (repeat_mean(resp_clean) - repeat_mean(resp_adv)).abs().nanmean(dim=0)


def _check_same(a, b, na, nb):
    if a.shape != b.shape:
        raise ValueError(f"{na} and {nb} must have the same (M, K) shape; got {tuple(a.shape)} vs {tuple(b.shape)}")


def nanstd(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """:func:`neuroguide.evaluation.metrics.statistics.sd` along ``dim`` (ddof 1 over the finite values, NaN where fewer
    than 2 are finite), under the name the closed loop's report uses."""
    return sd(x, dim)
