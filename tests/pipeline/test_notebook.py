"""The notebook's published figures beside a run of its protocol."""

from __future__ import annotations

import pytest

from pipeline import notebook
from pipeline.config import preset


def test_the_notebook_preset_follows_the_protocol_wherever_it_runs():
    config = preset("notebook")
    elsewhere = config.replace(
        {
            "data.data_dir": "/elsewhere",
            "execution.runner": "thread",
            "execution.workers": 1,
            "cv.seed": 7,
            "tracking.experiment": "mine",
        }
    )
    assert notebook.follows_protocol(config)
    assert notebook.follows_protocol(elsewhere)
    assert not notebook.follows_protocol(preset("default"))


@pytest.mark.parametrize(
    "change",
    [
        {"training.epochs": 20},
        {"model.hidden_sizes": [128, 64]},
        {"cv.l2_lambdas": [1e-3]},
        {"data.limit_train": 1000},
        {"data.normalization": "standardize"},
        {"data.dataset": "fashion-mnist"},
    ],
)
def test_another_protocol_is_not_the_notebook(change):
    assert not notebook.follows_protocol(preset("notebook").replace(change))
