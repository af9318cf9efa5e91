"""evaluate.py's multi-model and sweep modes with the region analyses: no result silently replaces another,
and models compared on one set of images must share its size."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import evaluate_in


def test_control_in_a_sweep_keeps_each_runs_own_result(guided_ckpts):
    """Control is per-model and multi-model; in sweep mode the multi-model part (all runs on the first run's images)
    used to overwrite each run's own numbers under the same key. Each run's value must equal its eval_metrics.json."""
    from neuroguide.evaluation.runner import EvaluationFailed

    from neuroguide.data.synthetic.imagenet import write_synthetic_imagenet
    from neuroguide.models.checkpoints import read_checkpoint, save_model_file

    tmp, (a, b, _) = guided_ckpts
    sweep = tmp / "sweep_control"
    (sweep / "a").mkdir(parents=True)
    shutil.copy(a, sweep / "a" / "model.ckpt")
    # run b evaluates on images of its own (another seed): the multi-model part would attack it on a's images
    ck = read_checkpoint(b)
    root = write_synthetic_imagenet(tmp / "imagenet16_other", n_classes=2, n_train=4, n_val=4, image_size=16, seed=7)
    rc = {**ck.run_config, "data": {**ck.run_config["data"], "classification_root": str(root),
                                    "classification_class_list": str(root / "classes.txt")}}
    save_model_file(sweep / "b" / "model.ckpt", "guidance", ck.model_config, ck.state_dict, rc, facts=ck.facts)
    args = ("eval=[control]", "eval.control.eps_l2=[0.5]", "eval.control.eps_linf=[]", "eval.control.steps=3",
            "eval.control.n_images=2", "eval.control.category_flip.enabled=false")
    with pytest.raises(EvaluationFailed) as info:  # the sweep report needs train.py's run folders: expected
        evaluate_in(tmp, "e_sweep_control", f"sweep_dir={sweep}", *args)
    assert list(info.value.failures) == ["eval/report/failed"]
    m = json.loads((tmp / "e_sweep_control" / "metrics.json").read_text())
    for run in ("a", "b"):
        own = json.loads((sweep / run / "eval_metrics.json").read_text())
        key = "eval/control/l2_0.5/up/change_sd"
        assert m[f"{run}/{key}"] == own[key]


def test_control_of_models_of_two_input_sizes_is_refused(guided_ckpts):
    from neuroguide.evaluation.runner import EvaluationFailed

    tmp, (a, _, c) = guided_ckpts
    with pytest.raises(EvaluationFailed, match=r"control needs models with one input size.*16 px.*24 px"):
        evaluate_in(tmp, "e_sizes_control", f"models=[{a},{c}]", "eval=[control]", "eval.control.eps_linf=[]",
                    "eval.control.steps=2", "eval.control.n_images=2")
