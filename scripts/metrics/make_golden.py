"""Golden values for src/metrics.rs from scikit-learn (run once: python scripts/metrics/make_golden.py).

Random labels, predictions and patient groups (seeded), and sklearn's accuracy, weighted F1, per-class
precision/recall/F1/support and confusion matrix; patient-level accuracy as METHOD.md defines it (mean over
patients of each patient's share of correct images); image-wise accuracy by majority vote over patches
(scipy-style mode: ties go to the smallest label).
"""
import json
import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

rng = np.random.default_rng(2023)
cases = []
for n, k in [(57, 2), (200, 4), (31, 3)]:
    y = rng.integers(0, k, n)
    # Better than chance but imperfect.
    p = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
    g = rng.integers(0, 9, n)
    pr, rc, f1, sup = precision_recall_fscore_support(y, p, labels=list(range(k)), zero_division=0)
    groups = sorted(set(g.tolist()))
    patient_acc = float(np.mean([np.mean(p[g == i] == y[g == i]) for i in groups]))
    # Majority vote per group; the group's label is its first image's label in this synthetic case.
    voted_true, voted_pred = [], []
    for i in groups:
        votes = np.bincount(p[g == i], minlength=k)
        voted_pred.append(int(np.argmax(votes)))
        voted_true.append(int(y[g == i][0]))
    cases.append({
        "classes": k,
        "labels": y.tolist(),
        "predicted": p.tolist(),
        "groups": [f"p{i}" for i in g.tolist()],
        "accuracy": accuracy_score(y, p),
        "weighted_f1": f1_score(y, p, average="weighted", zero_division=0),
        "precision": pr.tolist(),
        "recall": rc.tolist(),
        "f1": f1.tolist(),
        "support": sup.tolist(),
        "confusion": confusion_matrix(y, p, labels=list(range(k))).tolist(),
        "patient_accuracy": patient_acc,
        "vote_predicted": voted_pred,
        "vote_labels_first": voted_true,
    })
json.dump({"sklearn": __import__("sklearn").__version__, "cases": cases}, open("tests/golden/metrics/sklearn.json", "w"))
