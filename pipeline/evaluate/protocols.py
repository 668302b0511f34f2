"""Frozen-feature protocols as pure functions: linear probe, kNN, retrieval, top-k accuracy.

Inputs are numpy arrays of per-video features over views, [N, V, D], and integer labels [N];
outputs are dicts of accuracies in [0, 1]. Nothing here reads files or knows about models.
"""
import numpy as np
import torch

KNN_KS = (10, 20, 100, 200)
RECALL_KS = (1, 5, 10, 20, 50)


def l2n(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def topk_accuracy(scores, labels, k):
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean([labels[i] in top[i] for i in range(len(labels))]))


def fit_logreg(x, y, wd):
    """Multinomial logistic regression minimising mean cross-entropy + wd * ||W||^2 (bias free),
    with scikit-learn's L-BFGS from a zero start to a gradient tolerance: converged, and the same
    result whatever ran before. x [N,D] float, y [N] int. sklearn's C is 1 / (2 * wd * N)."""
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(C=1.0 / (2 * wd * len(x)), tol=1e-8, max_iter=10000).fit(x, y)


def class_log_probs(model, x, num_classes):
    """[N, num_classes] log-probabilities; classes absent from the training set get -inf.

    Log-softmax of the decision scores, in float64: not sklearn's predict_log_proba, which takes the
    log of probabilities that underflow to 0 (a test video far outside the training features gives
    scores 100+ apart) and warns "divide by zero encountered in log"."""
    scores = torch.from_numpy(np.asarray(model.decision_function(x), np.float64))
    if scores.ndim == 1:  # two classes: sklearn's one score d is softmax([0, d])
        scores = torch.stack([torch.zeros_like(scores), scores], 1)
    out = np.full((len(x), num_classes), -np.inf, np.float64)
    out[:, model.classes_] = scores.log_softmax(1).numpy()
    return out


def grouped_holdout(n, groups, share, seed):
    """Indices (fit, hold) with about `share` of n held out, whole groups at a time (clips of one
    source video on both sides would make the held-out accuracy, and so the chosen weight decay, leak)."""
    groups = np.arange(n) if groups is None else np.asarray(groups)
    unique = np.random.default_rng(seed).permutation(np.unique(groups))
    hold_groups, count = [], 0
    for g in unique:
        if count >= max(1, round(share * n)):
            break
        hold_groups.append(g)
        count += int((groups == g).sum())
    hold = np.isin(groups, hold_groups)
    return np.flatnonzero(~hold), np.flatnonzero(hold)


def linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes, seed=0, train_groups=None):
    """Multinomial logistic regression on L2-normalised, standardised clip features.

    Weight decay is picked on a held-out 20 % of the training videos (whole groups: train_groups
    names each video's source, as the split does), then the probe is refit on all.
    """
    n, v, d = train_feats.shape
    x_all = l2n(train_feats).reshape(n * v, d)
    mean, std = x_all.mean(0), x_all.std(0) + 1e-6

    def prep(f):
        return ((l2n(f) - mean) / std).reshape(-1, d)

    fit, hold = grouped_holdout(n, train_groups, 0.2, seed)
    best_wd, best_acc = 1e-4, -1.0
    if len(fit) >= num_classes and len(hold) and len(np.unique(train_labels[fit])) > 1:
        for wd in (1e-5, 1e-4, 1e-3, 1e-2):
            model = fit_logreg(prep(train_feats[fit]), np.repeat(train_labels[fit], v), wd)
            acc = (model.predict(prep(train_feats[hold])) == np.repeat(train_labels[hold], v)).mean()
            if acc > best_acc:
                best_wd, best_acc = wd, acc
    model = fit_logreg(prep(train_feats), np.repeat(train_labels, v), best_wd)
    logits = class_log_probs(model, prep(test_feats), num_classes).reshape(len(test_feats), v, -1)
    return view_accuracies(logits, test_labels, num_classes) | {"weight_decay": best_wd}


def view_accuracies(logits, labels, num_classes):
    """Clip- and video-level accuracy of class scores over views: logits [N,V,C], labels [N].

    Clip-level: each view is a sample; video-level: softmax averaged over a video's views.
    """
    v = logits.shape[1]
    clip_scores, clip_labels = logits.reshape(-1, num_classes), np.repeat(labels, v)
    video_scores = torch.from_numpy(logits).softmax(-1).mean(1).numpy()
    out = {"clip_top1": topk_accuracy(clip_scores, clip_labels, 1), "video_top1": topk_accuracy(video_scores, labels, 1)}
    if num_classes > 5:  # with 5 classes or fewer, top-5 is 100 % by construction
        out |= {"clip_top5": topk_accuracy(clip_scores, clip_labels, 5), "video_top5": topk_accuracy(video_scores, labels, 5)}
    return out


def knn_classify(train_feats, train_labels, test_feats, test_labels, num_classes, ks=KNN_KS, temperature=0.07):
    """Weighted kNN on cosine similarity of video features (views averaged): vote exp(sim / T).

    Only k up to the number of training videos is reported (a larger k would be mislabelled); with
    fewer training videos than the smallest k, k is the number of training videos."""
    tr, te = l2n(l2n(train_feats).mean(1)), l2n(l2n(test_feats).mean(1))
    sims = te @ tr.T  # [Ntest, Ntrain]
    out = {}
    for k in [k for k in ks if k <= len(tr)] or [len(tr)]:
        idx = np.argsort(-sims, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sims, idx, 1) / temperature)
        votes = np.zeros((len(te), num_classes))
        np.add.at(votes, (np.arange(len(te))[:, None], train_labels[idx]), weights)
        out[f"k{k}_top1"] = float((votes.argmax(1) == test_labels).mean())
    return out


def retrieval(train_feats, train_labels, test_feats, test_labels, ks=RECALL_KS):
    """Test videos query the train set; R@k = share of queries with a same-class video in the top k.

    Only k below the number of training videos is reported (R@N_train is 100 % by construction)."""
    tr, te = l2n(l2n(train_feats).mean(1)), l2n(l2n(test_feats).mean(1))
    order = np.argsort(-(te @ tr.T), axis=1)
    hits = train_labels[order] == test_labels[:, None]
    return {f"R@{k}": float(hits[:, :k].any(1).mean()) for k in ks if k < len(tr)}


def wilson_interval(p, n, z=1.96):
    """(low, high) 95 % Wilson score interval of a share p measured on n independent samples: it stays
    inside [0, 1] and is honest at small n and near 0 or 1, where p ± z·se is not."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def chance_level(metric, train_labels, num_classes, test_labels):
    """What a metric scores without looking at the videos: top-k accuracy (linear, kNN, fine-tuning) of
    a uniform guess, k / classes; R@k of k train videos drawn at random, exactly, averaged over the
    test queries. None for what is not an accuracy (weight_decay, epochs)."""
    if metric.startswith("R@"):
        k, n = int(metric[2:]), len(train_labels)
        per_class = np.bincount(train_labels, minlength=num_classes)
        miss = [np.prod([(n - per_class[c] - i) / (n - i) for i in range(min(k, n))]) for c in test_labels]
        return float(1 - np.mean(miss)) if len(miss) else None
    if metric.endswith("_top1") or metric.endswith("_top5"):
        return min(int(metric[-1]), num_classes) / num_classes
    return None


def zero_shot(feats, labels, class_vectors):
    """Classify by the cosine between each view's concept-space embedding and the class names' text
    embeddings; no training side. feats [N,V,D], labels [N], class_vectors [K,D] (unit rows).
    Clip level: every view scored on its own; video level: the views' embeddings averaged."""
    views = l2n(feats)  # [N,V,D]
    clip_scores = views.reshape(-1, views.shape[-1]) @ class_vectors.T  # [N*V,K]
    video_scores = l2n(views.mean(1)) @ class_vectors.T  # [N,K]
    clip_labels = np.repeat(labels, views.shape[1])
    out = {}
    for k in (1, 5) if len(class_vectors) > 5 else (1,):  # top-5 of 5 classes or fewer is always 100 %
        out[f"video_top{k}"] = topk_accuracy(video_scores, labels, k)
        out[f"clip_top{k}"] = topk_accuracy(clip_scores, clip_labels, k)
    return out
