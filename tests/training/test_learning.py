"""A canary for the method itself: a thin tiny stage, trained deterministically on a small fixed synthetic
set, must learn to rank the grades (issue 15). A change that breaks learning (the loss, the transfer of
labels to the pipeline, the augmentation, the optimiser, the model) fails here, not in a user's run.

The bar sits well below what the stage reaches and well above what the same stage reaches when it cannot
learn (a learning rate of 1e-9): both are measured in the test, on the same images.
"""

import json

import pytest

from retina_scale.config import load_train_config

BAR = 0.35
"""The tiny stage's validation kappa at optimised cut-offs must clear this. Measured on this set (2-core AMD
EPYC, TF 2.21, Keras 3.15; deterministic, the same to the last digit in two runs): 0.756 when it learns (lr 3e-3);
0.119 for the lr-1e-9 control."""


@pytest.fixture(scope="module")
def fixed_set(tmp_path_factory):
    """240 synthetic photos (balanced grades, fundus 224 px, seed 11) cached at 112 px."""
    from retina_scale.data.cache import prepare_cache
    from retina_scale.data.sources import read_dataset
    from retina_scale.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("learning-data")
    generate_dataset(str(root / "synthetic"), count=240, size=224, seed=11, prior="balanced", workers=1,
                     progress=False)
    prepare_cache(read_dataset(root / "synthetic"), root / "cache", sizes=(112,), workers=1, progress=False)
    return root


def _tiny_stage(root, name: str, lr: float) -> dict:
    from retina_scale.training.stepwise import StepwiseScaler

    overrides = [
        f"runs_dir={json.dumps(str(root / 'runs'))}", f"name={name}", "export=false", "eval_bootstrap=20",
        f"data.data={json.dumps(str(root / 'synthetic'))}", f"data.cache={json.dumps(str(root / 'cache'))}",
        "data.workers=1", "data.val_fraction=0.25", "data.test_fraction=0.1", "model.width=0.125",
        "global_batch_size=16", "tune.enabled=false", "fusion.enabled=false", "seed=5", "deterministic=true",
        f"stages=[{{stage: tiny, epochs: 8, lr: {lr}}}]",
    ]
    report = StepwiseScaler(load_train_config("quick", overrides), verbose=0).run()
    (stage,) = report["stages"]
    return stage


@pytest.mark.slow
def test_a_thin_tiny_stage_learns_to_rank_the_grades(fixed_set):
    learned = _tiny_stage(fixed_set, "learns", 3e-3)
    frozen = _tiny_stage(fixed_set, "control", 1e-9)
    assert learned["selection"] == frozen["selection"] == "val_kappa_optimized"
    assert learned["selection_score"] > BAR, learned["selection_score"]
    assert frozen["selection_score"] < BAR, frozen["selection_score"]  # the bar tells learning from not
