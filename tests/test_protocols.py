"""Evaluation protocols on known answers: linear probe, weighted kNN, retrieval recall."""
import warnings

import numpy as np
import pytest
import torch

from pipeline.evaluate.protocols import class_log_probs, fit_logreg, knn_classify, linear_probe, retrieval


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


def test_linear_probe_is_deterministic_and_converged():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 16))
    train = np.stack([centres[i % 4] + 1.5 * rng.normal(size=(2, 16)) for i in range(60)])  # [60,2,16], overlapping
    test = np.stack([centres[i % 4] + 1.5 * rng.normal(size=(2, 16)) for i in range(40)])
    ytr, yte = np.arange(60) % 4, np.arange(40) % 4
    torch.manual_seed(1)
    np.random.seed(1)
    first = linear_probe(train, ytr, test, yte, 4, seed=0)
    torch.manual_seed(12345)  # another global random state: the same numbers
    np.random.seed(12345)
    torch.randn(1000)
    assert linear_probe(train, ytr, test, yte, 4, seed=0) == first


def test_the_probe_reaches_the_optimum_of_its_objective():
    """An independent solver (scipy's L-BFGS on the same objective: mean cross-entropy + wd |W|^2)
    finds the same probabilities: the probe stops at the optimum, not at an iteration cap."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    from pipeline.evaluate.protocols import class_log_probs, fit_logreg
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 10))
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.8 * rng.normal(size=120) > 0).astype(int) + (x[:, 2] > 1)
    wd, k, d = 1e-3, 3, 10

    def objective(theta):
        w, b = theta[:k * d].reshape(k, d), theta[k * d:]
        logp = log_softmax(x @ w.T + b, axis=1)
        p = np.exp(logp)
        p[np.arange(len(y)), y] -= 1
        grad_w = p.T @ x / len(y) + 2 * wd * w
        return -logp[np.arange(len(y)), y].mean() + wd * (w ** 2).sum(), np.concatenate([grad_w.ravel(), p.mean(0)])
    theta = minimize(objective, np.zeros(k * d + k), jac=True, method="L-BFGS-B",
                     options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 10000}).x
    reference = log_softmax(x @ theta[:k * d].reshape(k, d).T + theta[k * d:], axis=1)
    ours = class_log_probs(fit_logreg(x, y, wd), x, k)
    np.testing.assert_allclose(np.exp(ours), np.exp(reference), atol=1e-4)


def test_the_weight_decay_hold_out_keeps_groups_together():
    from pipeline.evaluate.protocols import grouped_holdout
    groups = np.repeat(np.arange(10), 3)  # 10 source videos, 3 clips each
    fit, hold = grouped_holdout(30, groups, 0.2, seed=0)
    assert len(hold) == 6 and set(groups[fit]).isdisjoint(groups[hold])
    assert sorted(np.concatenate([fit, hold])) == list(range(30))


def far_test_videos(c=4, per_class=4, d=16, seed=0):
    """Training videos of which one per class barely shows a feature that its class's test video shows
    strongly: standardised by the tiny training spread, that test video's class scores lie hundreds
    apart, and the other classes' probabilities underflow to 0 (what the demo's inflate row met)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d))
    labels, test_labels = np.repeat(np.arange(c), per_class), np.arange(c)
    train = (centres[labels] + 0.3 * rng.normal(size=(len(labels), d)))[:, None, :]
    test = (centres[test_labels] + 0.3 * rng.normal(size=(c, d)))[:, None, :]
    train[:, 0, -c:], test[:, 0, -c:] = 0, 0
    train[np.arange(c) * per_class, 0, d - c + np.arange(c)] = 1e-4
    test[np.arange(c), 0, d - c + np.arange(c)] = 1.0
    return train.astype(np.float32), labels, test.astype(np.float32), test_labels


def test_the_probe_warns_of_nothing_when_probabilities_underflow():
    train, labels, test, test_labels = far_test_videos()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's "divide by zero encountered in log" would raise
        out = linear_probe(train, labels, test, test_labels, 4)
    assert out["video_top1"] == 1.0


@pytest.mark.parametrize("classes", [2, 5])
def test_class_log_probs_are_sklearns_where_those_are_finite(classes):
    rng = np.random.default_rng(classes)
    x, y = rng.normal(size=(40, 6)), np.arange(40) % classes
    model = fit_logreg(x, y, 1e-3)
    test = rng.normal(size=(10, 6)) * np.r_[1, 1, 1, 1, 1, 100]  # some scores far apart
    ours, theirs = class_log_probs(model, test, classes + 1), np.full((10, classes + 1), -np.inf)
    with np.errstate(divide="ignore"):
        theirs[:, :classes] = model.predict_log_proba(test)
    finite = np.isfinite(theirs)
    assert np.allclose(ours[finite], theirs[finite], atol=1e-9)
    assert np.isfinite(ours[:, :classes]).all() and (ours[:, classes] == -np.inf).all()  # an absent class: -inf
    assert np.allclose(np.exp(ours).sum(1), 1)


def test_wilson_interval_matches_known_values_and_stays_in_range():
    from pipeline.evaluate.protocols import wilson_interval
    low, high = wilson_interval(0.5, 2)
    assert abs(low - 0.0945) < 1e-3 and abs(high - 0.9055) < 1e-3
    assert wilson_interval(1.0, 3)[1] == 1.0 and wilson_interval(1.0, 3)[0] > 0.4  # never [1, 1] from 3 videos
    assert wilson_interval(0.0, 10)[0] == 0.0 and 0.2 < wilson_interval(0.0, 10)[1] < 0.35
    assert wilson_interval(0.8, 1000)[1] - wilson_interval(0.8, 1000)[0] < 0.06
    assert wilson_interval(0.3, 0) == (0.0, 1.0)


def test_chance_levels_of_top_k_and_of_retrieval():
    from pipeline.evaluate.protocols import chance_level
    train, test = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 2])
    assert chance_level("video_top1", train, 3, test) == 1 / 3 and chance_level("k10_top1", train, 3, test) == 1 / 3
    assert chance_level("clip_top5", train, 10, test) == 0.5 and chance_level("video_top5", train, 3, test) == 1.0
    # R@1: one random train video of 6, 2 of the query's class; R@5: 5 of 6 always include one of them
    assert abs(chance_level("R@1", train, 3, test) - 2 / 6) < 1e-12 and chance_level("R@5", train, 3, test) == 1.0
    assert abs(chance_level("R@2", train, 3, test) - (1 - (4 / 6) * (3 / 5))) < 1e-12
    assert chance_level("weight_decay", train, 3, test) is None


def test_zero_shot_scores_views_alone_and_their_average():
    from pipeline.evaluate.protocols import zero_shot
    classes = np.eye(6, 8, dtype=np.float32)  # six orthogonal class-name vectors
    labels = np.array([0, 1, 2, 3])
    feats = classes[labels][:, None, :].repeat(3, 1) * 2.0  # every view on its class (length does not matter)
    feats[0, 0] = classes[5]  # one wrong view of video 0: outvoted by its two right ones
    got = zero_shot(feats, labels, classes)
    assert got["video_top1"] == 1.0 and got["clip_top1"] == 11 / 12 and got["clip_top5"] == 1.0
    assert set(zero_shot(feats, labels, classes[:4])) == {"video_top1", "clip_top1"}  # 4 classes: top-5 is trivial
