"""The picture at the end of a run: loss curve and a 2-D map of held-out features."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_run(path: Path, steps: list[int], losses: list[float], features: np.ndarray,
             labels: np.ndarray, title: str) -> None:
    """Write a PNG: training loss vs step, and a t-SNE projection of ``features`` (N×D)
    coloured by class ``labels`` (N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    xy = TSNE(n_components=2, init="pca", random_state=0,
              perplexity=min(30.0, max(2.0, len(features) / 4 - 1))).fit_transform(features)
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax_loss.plot(steps, losses)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_loss.grid(alpha=0.3)
    points = ax_map.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=6)
    ax_map.legend(*points.legend_elements(), fontsize=7, loc="best", title="class")
    ax_map.set(title="held-out features (t-SNE)", xticks=[], yticks=[])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
