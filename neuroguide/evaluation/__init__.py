"""Evaluation analyses shared by every model kind: unit sensitivity, classification robustness,
transfer attacks (and, from other modules, shape bias, RSA/CKA, smoothness)."""
