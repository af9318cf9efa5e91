"""Shape bias on cue-conflict images (Geirhos et al. 2019; the model-vs-human toolbox).

A cue-conflict image has the shape of one category and the texture of another. A decision is a
*shape decision* when the model picks the shape category and a *texture decision* when it picks the
texture category (any other answer counts as neither). Images whose shape and texture categories
agree are dropped, and

    shape_bias = #shape decisions / (#shape decisions + #texture decisions)

(``ShapeBias.analysis`` in bethgelab/model-vs-human ``modelvshuman/plotting/analyses.py``). The
per-category table groups images by their shape category, as the familiar figure of Geirhos et al.
(one marker per category on an axis from "texture" (0) to "shape" (1), a line at the mean).

Two sources of cue-conflict images:

1. The standard stimulus folder of Geirhos et al.: ``<dir>/<shape category>/<name>.png`` with the
   texture category in the file name after the last ``-`` (``airplane/airplane1-bicycle2.png``;
   model-vs-human prefixes such as ``0001_..._dog10-bird2.png`` are fine). Decisions are over the 16
   categories of :mod:`.imagenet16`: a category's probability is the mean
   softmax probability over its ImageNet classes that the model has (all of them for an ImageNet-1k
   model, those in its subset for e.g. ImageNet-50). Categories the model has no class for are
   *unmapped*: they are left out of the decision, and images whose shape or texture category is
   unmapped are dropped (the model could never make that decision).
2. Images made from the model's own classes by style transfer (:mod:`.style_transfer`, as Shao et
   al.); the decision is the argmax over the model's classes.
3. The synthetic cue-conflict set of the embedded default data
   (:mod:`neuroguide.data.synthetic.cue_conflict`: the silhouette of class ``a`` filled with the
   periodic texture of class ``b``), in the layout of 1. plus a ``categories.txt`` naming the
   model's own classes; read by the same reader, the decision is the argmax over the model's
   classes. ``stimuli_dir="auto"`` picks it for models trained on synthetic data, and 1. otherwise.

Modules: :mod:`.metric` (the measure, its table and figure), :mod:`.stimuli` (reading a
stimulus folder), :mod:`.core` (a model's decisions; ``evaluate``), :mod:`.imagenet16` (the
16-category table), :mod:`.style_transfer` (AdaIN).
"""
from neuroguide.evaluation.analyses.shape_bias.core import (category_probabilities, evaluate, evaluate_folder,
                                                   evaluate_style_transfer, model_classes, model_decisions, own_columns)
from neuroguide.evaluation.analyses.shape_bias.imagenet16 import CATEGORIES, category_columns
from neuroguide.evaluation.analyses.shape_bias.metric import ShapeBiasResult, shape_bias, shape_bias_figure
from neuroguide.evaluation.analyses.shape_bias.stimuli import (IMAGE_EXTENSIONS, CueConflictStimulus, folder_categories,
                                                      load_images, parse_name, read_cue_conflict, resolve_stimuli_dir)

__all__ = ["CATEGORIES", "IMAGE_EXTENSIONS", "CueConflictStimulus", "ShapeBiasResult", "category_columns",
           "category_probabilities", "evaluate", "evaluate_folder", "evaluate_style_transfer", "folder_categories",
           "load_images", "model_classes", "model_decisions", "own_columns", "parse_name", "read_cue_conflict",
           "resolve_stimuli_dir", "shape_bias", "shape_bias_figure"]

from neuroguide.evaluation.registry import per_model  # noqa: E402


@per_model("shape_bias", needs_labels=True)
def _shape_bias(model, stim, out, p):
    return evaluate(model, out, images=stim.images, labels=stim.labels, **p)
