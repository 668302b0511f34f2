"""Frozen-feature protocols as pure functions: linear probe, kNN, retrieval, top-k accuracy.

Inputs are numpy arrays of per-video features over views, [N, V, D], and integer labels [N];
outputs are dicts of accuracies in [0, 1]. Nothing here reads files or knows about models.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

KNN_KS = (10, 20, 100, 200)
RECALL_KS = (1, 5, 10, 20, 50)


def l2n(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def topk_accuracy(scores, labels, k):
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean([labels[i] in top[i] for i in range(len(labels))]))


def _fit_logreg(x, y, num_classes, wd, steps=200):
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    head = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + wd * head.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return head


def linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes, seed=0):
    """Multinomial logistic regression on L2-normalised, standardised clip features.

    Weight decay is picked on a held-out 20 % of the training videos, then the probe is refit on all.
    """
    n, v, d = train_feats.shape
    x_all = l2n(train_feats).reshape(n * v, d)
    mean, std = x_all.mean(0), x_all.std(0) + 1e-6

    def prep(f):
        return ((l2n(f) - mean) / std).astype(np.float32)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    hold = order[: max(1, n // 5)]
    fit = order[max(1, n // 5):]
    best_wd, best_acc = 1e-4, -1.0
    if len(fit) >= num_classes:
        for wd in (1e-5, 1e-4, 1e-3, 1e-2):
            head = _fit_logreg(prep(train_feats[fit]).reshape(-1, d), np.repeat(train_labels[fit], v), num_classes, wd)
            with torch.no_grad():
                acc = (head(torch.from_numpy(prep(train_feats[hold]).reshape(-1, d))).argmax(1).numpy()
                       == np.repeat(train_labels[hold], v)).mean()
            if acc > best_acc:
                best_wd, best_acc = wd, acc
    torch.manual_seed(seed)
    head = _fit_logreg(prep(train_feats).reshape(-1, d), np.repeat(train_labels, v), num_classes, best_wd)
    with torch.no_grad():
        logits = head(torch.from_numpy(prep(test_feats).reshape(-1, d))).reshape(len(test_feats), v, -1)
    return view_accuracies(logits.numpy(), test_labels, num_classes) | {"weight_decay": best_wd}


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
