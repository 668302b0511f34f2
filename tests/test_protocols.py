"""Evaluation protocols on known answers: linear probe, weighted kNN, retrieval recall."""
import numpy as np

from pipeline.protocols import knn_classify, linear_probe, retrieval


def clusters(centres, n_per_class, views, spread, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), n_per_class)
    feats = centres[labels][:, None, :] + rng.normal(size=(len(labels), views, centres.shape[1])) * spread
    return feats.astype(np.float32), labels


def test_protocols_on_separable_clusters_score_perfectly():
    centres = np.random.default_rng(0).normal(size=(5, 16)) * 5
    trf, trl = clusters(centres, 20, 3, 0.3, 1)
    tef, tel = clusters(centres, 10, 3, 0.3, 2)
    lin = linear_probe(trf, trl, tef, tel, 5)
    assert lin["video_top1"] == 1.0 and lin["clip_top1"] > 0.97
    assert "video_top5" not in lin  # 5 classes: top-5 would be 100 % whatever the features
    knn = knn_classify(trf, trl, tef, tel, 5)
    assert knn["k10_top1"] == 1.0 and knn["k20_top1"] == 1.0
    assert retrieval(trf, trl, tef, tel)["R@1"] == 1.0


def test_knn_votes_are_weighted_by_similarity_and_k_is_honest():
    # the query sits close to one class-0 video and far from two class-1 videos: a plain majority of
    # k=3 says 1, the exp(sim / 0.07) weighted vote says 0
    train = np.array([[1.0, 0.0], [-0.2, 1.0], [-0.3, 1.0]], np.float32)[:, None]
    test = np.array([[1.0, 0.05]], np.float32)[:, None]
    out = knn_classify(train, np.array([0, 1, 1]), test, np.array([0]), 2, ks=(1, 3, 10))
    assert out == {"k1_top1": 1.0, "k3_top1": 1.0}  # k 10 > 3 train videos: not reported under a false name


def test_retrieval_recall_counts_a_hit_anywhere_in_the_top_k():
    # the query's nearest neighbours in order: class 1, class 1, class 0 (its own), class 1, class 1
    angles = np.radians([0, 10, 20, 30, 40, 50])
    train = np.stack([np.cos(angles[1:]), np.sin(angles[1:])], 1).astype(np.float32)[:, None]
    test = np.array([[1.0, 0.0]], np.float32)[:, None]
    r = retrieval(train, np.array([1, 1, 0, 1, 1]), test, np.array([0]), ks=(1, 2, 3, 5))
    assert r == {"R@1": 0.0, "R@2": 0.0, "R@3": 1.0}  # R@5 = all 5 train videos: trivially 1, left out


def test_protocols_on_random_features_are_near_chance():
    rng = np.random.default_rng(0)
    trf, tef = rng.normal(size=(200, 2, 32)).astype(np.float32), rng.normal(size=(200, 2, 32)).astype(np.float32)
    trl, tel = rng.integers(0, 10, 200), rng.integers(0, 10, 200)
    assert linear_probe(trf, trl, tef, tel, 10)["video_top1"] < 0.2
    assert knn_classify(trf, trl, tef, tel, 10)["k20_top1"] < 0.2
    assert retrieval(trf, trl, tef, tel)["R@1"] < 0.2
