"""Accuracy of a hard classification against true states, with discarded particles.

The metric of AlphaCryo4D's blind tests (Wu et al. 2022, section 2.2 and Fig. 2E): each output
class is labelled with the true state that holds most of its particles;

- precision of a class = its particles of that state / its particles (class purity);
- recall of a true state = its particles in classes labelled with it / its particles;
- discard rate = particles with no class (label ``-1``) / all particles;
- ARI of the kept particles (adjusted Rand index of the assignment on the particles that
  have a class), which does not reward discarding by itself beyond the kept set.

:func:`matched_precision_recall` is the one-to-one variant used by the benchmarks: classes are
matched to true states by the Hungarian algorithm on the kept particles' confusion matrix, so a
state split over two classes is not rewarded twice (the majority labelling above lets several
classes share one state).

Example usage::

    scores = classification_scores(true_states, voted_labels)
    scores["precision_mean"], scores["recall_mean"], scores["discard_rate"], scores["ari_kept"]
    matched = matched_precision_recall(true_states, voted_labels)   # Hungarian, macro-averaged
"""

from __future__ import annotations

import numpy as np


def classification_scores(true_labels: np.ndarray, labels: np.ndarray) -> dict:
    """Precision, recall, discard rate and ARI of the kept particles (see module docstring).

    :param true_labels: ``(N,)`` true state of every particle (``>= 0``).
    :param labels: ``(N,)`` assigned class, ``-1`` = discarded.
    :return: ``precision`` (per class, classes with particles), ``precision_mean`` (mean over
        those classes), ``precision_weighted`` (pooled: correct / kept), ``recall`` (per true
        state), ``recall_mean``, ``states_found`` (true states that label at least one class),
        ``discard_rate``, ``ari_kept``, ``n_kept``, ``n_classes``.
    """
    from sklearn.metrics import adjusted_rand_score

    true_labels = np.asarray(true_labels, dtype=np.int64).ravel()
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if true_labels.shape != labels.shape:
        raise ValueError(f"classification_scores: {true_labels.shape} true labels for {labels.shape} labels")
    n_true = int(true_labels.max()) + 1
    kept = labels >= 0
    classes = np.unique(labels[kept])
    precision, majority, correct = [], [], 0
    for c in classes:
        counts = np.bincount(true_labels[labels == c], minlength=n_true)
        majority.append(int(np.argmax(counts)))
        precision.append(counts.max() / counts.sum())
        correct += int(counts.max())
    majority = np.asarray(majority, dtype=np.int64)
    recall = np.zeros(n_true)
    for t in range(n_true):
        mine = classes[majority == t]
        total = np.sum(true_labels == t)
        recall[t] = np.sum(np.isin(labels, mine) & (true_labels == t)) / total if total else np.nan
    n_kept = int(kept.sum())
    return {
        "precision": [float(p) for p in precision],
        "precision_mean": float(np.mean(precision)) if precision else float("nan"),
        "precision_weighted": correct / n_kept if n_kept else float("nan"),
        "recall": recall.tolist(),
        "recall_mean": float(np.nanmean(recall)),
        "states_found": int(len(np.unique(majority))),
        "discard_rate": float(1 - n_kept / len(labels)) if len(labels) else float("nan"),
        "ari_kept": float(adjusted_rand_score(true_labels[kept], labels[kept])) if n_kept else float("nan"),
        "n_kept": n_kept,
        "n_classes": int(len(classes)),
    }


def matched_precision_recall(true_labels: np.ndarray, labels: np.ndarray) -> dict:
    """Per-state precision and recall after a one-to-one matching of classes to true states.

    The confusion matrix ``C[state, class]`` of the kept particles (``labels >= 0``) is matched by
    the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``, maximising the matched
    particles). For state ``s`` matched to class ``c``: precision = ``C[s, c]`` / kept particles
    in ``c``; recall = ``C[s, c]`` / all particles of ``s`` (discarded ones count as misses). A
    state left unmatched (fewer classes than states) has precision and recall 0. Both are
    macro-averaged over the true states.

    :param true_labels: ``(N,)`` true state of every particle (``>= 0``).
    :param labels: ``(N,)`` assigned class (any non-negative integers), ``-1`` = discarded.
    :return: ``precision``, ``recall`` (per true state), ``precision_macro``, ``recall_macro``,
        ``discard_fraction``, ``matching`` (per true state its class, ``-1`` if unmatched).
    :raises ValueError: the two arrays differ in length.
    """
    from scipy.optimize import linear_sum_assignment

    true_labels = np.asarray(true_labels, dtype=np.int64).ravel()
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if true_labels.shape != labels.shape:
        raise ValueError(f"matched_precision_recall: {true_labels.shape} true labels for {labels.shape} labels")
    kept = labels >= 0
    states, state_idx = np.unique(true_labels, return_inverse=True)
    classes, class_idx = np.unique(labels[kept], return_inverse=True)
    confusion = np.zeros((len(states), len(classes)), dtype=np.int64)
    np.add.at(confusion, (state_idx[kept], class_idx), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    precision = np.zeros(len(states))
    recall = np.zeros(len(states))
    matching = np.full(len(states), -1, dtype=np.int64)
    class_totals = confusion.sum(axis=0)
    state_totals = np.bincount(state_idx, minlength=len(states))
    for s, c in zip(rows, cols):
        matching[s] = classes[c]
        precision[s] = confusion[s, c] / class_totals[c] if class_totals[c] else 0.0
        recall[s] = confusion[s, c] / state_totals[s]
    return {
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "precision_macro": float(precision.mean()) if len(states) else float("nan"),
        "recall_macro": float(recall.mean()) if len(states) else float("nan"),
        "discard_fraction": float(1 - kept.mean()) if len(labels) else float("nan"),
        "matching": matching.tolist(),
    }
