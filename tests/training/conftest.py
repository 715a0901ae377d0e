"""A small synthetic data set with its cache at 112 and 224 px, shared by the trainer's tests."""

import pytest


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    from retina_scale.data.cache import prepare_cache
    from retina_scale.data.sources import read_dataset
    from retina_scale.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("stepwise-data")
    data = root / "synthetic"
    generate_dataset(str(data), count=48, size=224, seed=3, prior="balanced", workers=2, progress=False)
    cache = root / "cache"
    result = prepare_cache(read_dataset(data), cache, sizes=(112, 224), workers=2, progress=False)
    assert result.prepared == 48
    return data, cache
