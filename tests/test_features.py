"""The feature store: each video's features are computed once per backbone and view protocol."""
import h5py
import numpy as np

from pipeline.evaluate.feature_store import read_index, stored_features


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
    # the folder's index says what each store holds
    other = str(tmp_path / "other.h5")
    stored_features(other, ["v9"], compute, {"init": "teacher", "views": "frames"})
    index = read_index(str(tmp_path))
    assert sorted(index) == ["features.h5", "other.h5"]
    assert index["features.h5"]["views"] == "4 clips" and index["features.h5"]["videos"] == 1
    assert index["other.h5"]["init"] == "teacher" and (index["other.h5"]["views_per_video"], index["other.h5"]["dim"]) == (2, 3)
