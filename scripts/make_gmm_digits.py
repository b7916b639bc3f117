"""Build the `gmm-digits` zoo model: an exact 8x8 Gaussian mixture fitted to scikit-learn digits.

Per class c, k-means (k=4, fixed seed) on that class's images scaled to [-1, 1]; each cluster
becomes one isotropic component: mean = cluster mean image, std = RMS deviation in the cluster,
weight = cluster share of the whole dataset, label = c. Output:
gensample/zoo/data/gmm_digits.json (run from the repo root: python scripts/make_gmm_digits.py).
"""

import json
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits


def main(out: str = "gensample/zoo/data/gmm_digits.json", per_class: int = 4) -> None:
    data = load_digits()
    x = data.images.astype(np.float64) / 8.0 - 1.0  # (1797, 8, 8) in [-1, 1]
    y = data.target
    weights, means, stds, labels = [], [], [], []
    for c in range(10):
        xc = x[y == c].reshape(-1, 64)
        km = KMeans(n_clusters=per_class, n_init=10, random_state=0).fit(xc)
        for k in range(per_class):
            members = xc[km.labels_ == k]
            mu = members.mean(0)
            s = float(np.sqrt(((members - mu) ** 2).mean()))
            weights.append(len(members) / len(x))
            means.append(np.round(mu.reshape(1, 8, 8), 6).tolist())
            stds.append(round(s, 6))
            labels.append(c)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"weights": weights, "means": means, "stds": stds, "labels": labels}))
    print(f"wrote {out}: {len(weights)} components, stds {min(stds):.3f}..{max(stds):.3f}")


if __name__ == "__main__":
    main()
