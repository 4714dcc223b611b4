"""Accuracy of a hard classification against true states, with discarded particles.

The metric of AlphaCryo4D's blind tests (Wu et al. 2022, section 2.2 and Fig. 2E): each output
class is labelled with the true state that holds most of its particles;

- precision of a class = its particles of that state / its particles (class purity);
- recall of a true state = its particles in classes labelled with it / its particles;
- discard rate = particles with no class (label ``-1``) / all particles;
- ARI of the kept particles (adjusted Rand index of the assignment on the particles that
  have a class), which does not reward discarding by itself beyond the kept set.

Example usage::

    scores = classification_scores(true_states, voted_labels)
    scores["precision_mean"], scores["recall_mean"], scores["discard_rate"], scores["ari_kept"]
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
