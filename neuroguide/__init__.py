"""neuroguide: brain-guided and brain-predicting vision models (NSD, ImageNet, IT).

``neuroguide.load_model(path)`` rebuilds any trained model from its checkpoint without Hydra.
"""
from neuroguide.models.checkpoints import load_model

__all__ = ["load_model"]
__version__ = "0.1.0"
