"""The balanced training set is cached under a key that follows the decoder."""

from __future__ import annotations

import search.data.cache
from search.config import read_study_file
from search.data.prepared import prepare_data
from tests.search.conftest import make_dataset, write_study


def balanced_sets(cache_dir) -> set[str]:
    return {path.name for path in cache_dir.glob("balanced-*") if path.is_dir()}


def test_a_decoder_change_rebuilds_the_balanced_training_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path / "data", counts={"red": 6, "green": 4}, size=8,
                        modalities=("rgb",))
    config = read_study_file(str(write_study(tmp_path, data, modalities='["rgb"]',
                                             fusion='["none"]')))
    cache_dir = config.data.cache_dir

    prepare_data(config).train_split("oversample")
    first = balanced_sets(cache_dir)
    assert len(first) == 1
    prepare_data(config).train_split("oversample")
    assert balanced_sets(cache_dir) == first  # same decoder: the cached set is reused

    # A new decoder version re-decodes the splits; the training set built from them must
    # follow, or it would keep the old decoder's pixels beside new val/test pixels.
    monkeypatch.setattr(search.data.cache, "DECODE_VERSION", search.data.cache.DECODE_VERSION + 1)
    prepare_data(config).train_split("oversample")
    assert len(balanced_sets(cache_dir)) == 2
