"""The project's one attack engine: PGD (L2 / Linf) on any per-row objective.

    from neuroguide.attacks import pgd_attack, L2Step, LinfStep, objectives
    res = pgd_attack(model, x, objectives.CrossEntropy(y), eps=1.0, norm="l2", steps=10)

Used by adversarial training, unit sensitivity, classification robustness and transfer attacks.
"""
from neuroguide.attacks import objectives
from neuroguide.attacks.pgd import AttackResult, pgd_attack
from neuroguide.models.features import evaluation_mode  # lives with the activation extractor; kept here too
from neuroguide.attacks.steps import AttackerStep, L2Step, LinfStep, get_step_class

__all__ = ["pgd_attack", "AttackResult", "evaluation_mode", "objectives", "AttackerStep", "L2Step", "LinfStep",
           "get_step_class"]
