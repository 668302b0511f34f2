"""The feature store: each video's features are computed once per backbone and view protocol."""
import h5py
import numpy as np

from pipeline.features import stored_features


def test_feature_store_computes_each_video_once_across_tasks(tmp_path):
    calls = []

    def compute(ids):
        calls.append(list(ids))
        return np.stack([np.full((2, 3), int(i[1:]), np.float32) for i in ids])
    store, attrs = str(tmp_path / "features.h5"), {"init": "checkpoint", "views": "2 clips"}
    assert stored_features(store, ["v3", "v1"], compute, attrs)[:, 0, 0].tolist() == [3, 1]
    # another split over the same videos plus one new: only the new one is computed
    assert stored_features(store, ["v1", "v2", "v3"], compute, attrs)[:, 0, 0].tolist() == [1, 2, 3]
    assert calls == [["v3", "v1"], ["v2"]]
    with h5py.File(store) as f:
        assert [i.decode() for i in f["ids"][()]] == ["v1", "v2", "v3"] and f["features"].shape == (3, 2, 3)
    stored_features(store, ["v1"], compute, {**attrs, "views": "4 clips"})  # other views: not reused
    assert calls[-1] == ["v1"]
