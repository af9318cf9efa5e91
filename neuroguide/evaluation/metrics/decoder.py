"""A linear category decoder read out from a population response (the behavioural measure of Lonngqvist et al.).

``fit_decoder(responses (N, K), labels (N,), mean (K,), sigma (K,))`` fits a multinomial logistic regression
(scikit-learn, L2 penalty ``C``) on the z-scored responses ``(r - mean) / sigma`` and returns it as a torch
module :class:`LinearDecoder` ``(B, K) responses -> (B, C) logits``, so that an attack can be run through
``decoder(response(x))`` with the project's attack engine.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class LinearDecoder(nn.Module):
    """``logits = ((r - mean) / sigma) @ weight.T + bias``: (B, K) -> (B, C).

    ``classes`` (C,): the label each logit stands for (``labels`` are mapped to logit indices by
    :meth:`targets`). Parameters are frozen: the decoder is fixed once fitted.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor,
                 classes: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).flatten())
        self.register_buffer("sigma", torch.as_tensor(sigma, dtype=torch.float32).flatten())
        self.register_buffer("classes", torch.as_tensor(classes, dtype=torch.long))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        z = (r - self.mean) / self.sigma
        return z @ self.weight.T + self.bias

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """(N,) labels -> (N,) logit indices; a ValueError for a label the decoder was not fitted on."""
        labels = torch.as_tensor(labels).long().cpu()
        classes = self.classes.cpu()
        hit = labels[:, None] == classes[None, :]
        if not bool(hit.any(1).all()):
            missing = sorted(set(labels[~hit.any(1)].tolist()))
            raise ValueError(f"labels {missing} were not among the decoder's training classes {classes.tolist()}")
        return hit.float().argmax(1)

    @torch.no_grad()
    def correct(self, r: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) bool: whether each row of ``r`` (N, K) has its label's logit as the largest."""
        pred = self.forward(r.to(self.weight.device).float()).argmax(1).cpu()
        return pred == self.targets(labels)


def fit_decoder(responses: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor,
                c: float = 1.0, max_iter: int = 2000) -> LinearDecoder:
    """Multinomial logistic regression on ``(responses - mean) / sigma``.

    Args:
        responses: (N, K) clean population responses; labels: (N,) class labels (ints).
        mean, sigma: (K,) the z-scoring (sigma > 0).
        c: inverse L2 penalty of scikit-learn's ``LogisticRegression``.
    Returns:
        :class:`LinearDecoder` with C logits (a 2-class problem gets logits ``[0, w.z + b]``, the same softmax
        as scikit-learn's binary model).
    """
    from sklearn.linear_model import LogisticRegression

    y = torch.as_tensor(labels).long().cpu().numpy()
    r = torch.as_tensor(responses).float().cpu()
    if r.ndim != 2 or len(r) != len(y):
        raise ValueError(f"decoder: expected responses (N, K) and labels (N,), got {tuple(r.shape)} and {y.shape}")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"decoder: the training images hold {len(classes)} class ({classes.tolist()}); a category "
                         "decoder needs at least 2: use more labelled images (eval.population.n_images is the "
                         "number attacked; the others train the decoder)")
    z = ((r - mean.cpu()) / sigma.cpu()).double().numpy()
    fit = LogisticRegression(C=float(c), max_iter=int(max_iter)).fit(z, y)
    w, b = torch.from_numpy(fit.coef_).float(), torch.from_numpy(fit.intercept_).float()
    if len(classes) == 2:  # scikit-learn's binary model: one logit for classes[1] against classes[0]
        w, b = torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros_like(b), b])
    return LinearDecoder(w, b, mean, sigma, torch.from_numpy(fit.classes_))
