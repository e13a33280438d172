"""Loss functions of PIC and the methods it is compared with.

Pure functions: tensors in, scalar tensor out, single-process semantics (any gathering across
ranks happens before they are called). Logits and losses are computed in at least float32,
with autocast disabled, so that bf16/fp16 inputs or an enclosing autocast region never produce a
low-precision softmax; float64 inputs stay float64.

Symbols: B batch size, D feature dimension, C classifier rows, K negatives, N training
instances, τ temperature.
"""

import math

import torch
import torch.nn.functional as F

__all__ = [
    "cosine_logits",
    "info_nce",
    "instance_classification_loss",
    "nce_loss",
    "nt_xent",
]


def _full_precision(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors cast up to a common dtype of at least float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def _autocast_off(t: torch.Tensor) -> torch.autocast:
    # Autocast would run the matmuls below in bf16/fp16 even on float32 inputs.
    return torch.autocast(device_type=t.device.type, enabled=False)


def _check_temperature(fn: str, temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")


def _check_pair(fn: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    """Both tensors B×D with the same shape."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"{fn}: {names[0]} and {names[1]} must both be B×D with the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _similarities(
    fn: str, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """Dot products [q·k, q·n_1, ..., q·n_K], B×(1+K), positive at index 0.

    query, positive: B×D; negatives: K×D (shared by the batch) or B×K×D (one set per sample).
    Must be called with autocast off; returns at least float32.
    """
    _check_pair(fn, ("query", "key"), query, positive)
    b, d = query.shape
    shared = negatives.ndim == 2 and negatives.shape[1] == d
    per_sample = negatives.ndim == 3 and negatives.shape[0] == b and negatives.shape[2] == d
    if not (shared or per_sample) or negatives.shape[-2] < 1:
        raise ValueError(
            f"{fn}: negatives must be K×D (shared) or B×K×D (per sample) with K >= 1, "
            f"B={b}, D={d}; got {tuple(negatives.shape)}"
        )
    q, k, n = _full_precision(query, positive, negatives)
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ n.T if shared else torch.bmm(n, q.unsqueeze(2)).squeeze(2)
    return torch.cat([pos, neg], dim=1)


def cosine_logits(features: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """PIC's cosine-softmax logits: normalize(f) · normalize(W)ᵀ / τ.

    Args:
        features: B×D, any norm (normalised here).
        weight: C×D rows of the instance classifier, any norm (normalised here); C is N or a
            sampled subset of rows.
        temperature: τ > 0.

    Returns:
        B×C logits, float32 (float64 if an input is float64).
    """
    _check_temperature("cosine_logits", temperature)
    if features.ndim != 2 or weight.ndim != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(
            "cosine_logits: features must be B×D and weight C×D with the same D, "
            f"got {tuple(features.shape)} and {tuple(weight.shape)}"
        )
    with _autocast_off(features):
        f, w = _full_precision(features, weight)
        return F.normalize(f, dim=1) @ F.normalize(w, dim=1).T / temperature


def instance_classification_loss(
    features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """PIC's loss: mean cross-entropy of the cosine softmax over the classifier rows.

    L = −1/B Σ_b log softmax(normalize(f_b) · normalize(W)ᵀ / τ)[y_b]

    Args:
        features: B×D, any norm.
        weight: C×D classifier rows W, any norm (all N rows, or a sampled subset).
        labels: B, int64, y_b = row of `weight` holding sample b's positive, in [0, C).
        temperature: τ > 0.

    Returns:
        Scalar loss, float32 (float64 if an input is float64).
    """
    if labels.ndim != 1 or labels.shape[0] != features.shape[0] or labels.dtype != torch.long:
        raise ValueError(
            f"instance_classification_loss: labels must be an int64 vector of length "
            f"B={features.shape[0]}, got shape {tuple(labels.shape)} and dtype {labels.dtype}"
        )
    logits = cosine_logits(features, weight, temperature)
    with _autocast_off(logits):
        return F.cross_entropy(logits, labels)


def info_nce(
    query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, temperature: float,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE (MoCo; InstDisc as re-implemented by PIC): softmax over positive + K negatives.

    L = −1/B Σ_b log [ exp(q_b·k_b/τ) / (exp(q_b·k_b/τ) + Σ_j exp(q_b·n_bj/τ)) ],
    i.e. cross-entropy on logits [q·k, q·n_1, ..., q·n_K]/τ with the positive at index 0.

    Args:
        query: B×D, assumed already L2-normalised (not normalised here).
        key: B×D positives, assumed already L2-normalised.
        negatives: K×D shared by the whole batch (MoCo queue) or B×K×D, one set per sample
            (InstDisc memory bank); assumed already L2-normalised. K >= 1.
        temperature: τ > 0.
        exclude: optional B×K bool, True where negative j of sample b is left out of its sum
            (MoCo: a queued key of the query's own image); the positive always stays.

    Returns:
        Scalar loss, float32 (float64 if an input is float64).
    """
    _check_temperature("info_nce", temperature)
    with _autocast_off(query):
        logits = _similarities("info_nce", query, key, negatives) / temperature
        if exclude is not None:
            if exclude.shape != (logits.shape[0], logits.shape[1] - 1):
                raise ValueError(f"info_nce: exclude must be B×K = {logits.shape[0]}×"
                                 f"{logits.shape[1] - 1}, got {tuple(exclude.shape)}")
            logits = logits.masked_fill(F.pad(exclude, (1, 0)), float("-inf"))
        targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, targets)


def nce_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
    num_instances: int,
    z: float,
) -> torch.Tensor:
    """InstDisc's original noise-contrastive estimation loss (Wu et al. 2018).

    With v the query feature and v_i a memory-bank row, the non-parametric softmax is
    approximated as P(i|v) = exp(v_iᵀv/τ) / Z, with the normalisation constant Z estimated by
    the caller (Monte-Carlo: Z ≈ N · mean_j exp(v_jᵀv/τ) over sampled rows) and treated as a
    constant. Noise is uniform, P_n(i) = 1/N, with m = K noise samples per data sample, and

        h(i, v) = P(i|v) / (P(i|v) + m·P_n(i)),
        L = −1/B Σ_b [ log h(i_b, v_b) + Σ_{j=1..K} log(1 − h(j, v_b)) ],

    i.e. the positive term plus the sum (not the mean) over the K noise samples, averaged over
    the batch. Computed in log space (softplus) so that large exp(v_iᵀv/τ) cannot overflow.

    Args:
        query: B×D features v, assumed already L2-normalised.
        positive: B×D bank rows v_i of each sample's own instance, assumed L2-normalised.
        negatives: K×D noise rows shared by the batch or B×K×D per sample; K >= 1.
        temperature: τ > 0.
        num_instances: N, the number of training instances (P_n = 1/N).
        z: Z > 0, the estimated normalisation constant.

    Returns:
        Scalar loss, float32 (float64 if an input is float64).
    """
    _check_temperature("nce_loss", temperature)
    if num_instances < 1:
        raise ValueError(f"nce_loss: num_instances must be >= 1, got {num_instances}")
    if not (z > 0 and math.isfinite(z)):
        raise ValueError(f"nce_loss: z must be a finite positive number, got {z}")
    with _autocast_off(query):
        log_p = _similarities("nce_loss", query, positive, negatives) / temperature - math.log(z)
        num_negatives = log_p.shape[1] - 1
        log_noise = math.log(num_negatives / num_instances)  # log(m·P_n(i))
        # −log h = softplus(log(m·P_n) − log P);  −log(1 − h) = softplus(log P − log(m·P_n))
        data_term = F.softplus(log_noise - log_p[:, 0])
        noise_term = F.softplus(log_p[:, 1:] - log_noise).sum(dim=1)
        return (data_term + noise_term).mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each of the 2B views is an anchor with one positive (the other view
    of its image) and 2B−2 negatives (every other view); self-similarity is excluded.

    With z = normalize([z1; z2]) (2B×D) and s_ij = z_i·z_j/τ,
    L = −1/(2B) Σ_i log [ exp(s_i,p(i)) / Σ_{j≠i} exp(s_ij) ], p(i) = i ± B.

    Args:
        z1: B×D projections of the first views, any norm (normalised here); B >= 2.
        z2: B×D projections of the second views, row b pairs with z1[b].
        temperature: τ > 0.

    Returns:
        Scalar loss, float32 (float64 if an input is float64).
    """
    _check_temperature("nt_xent", temperature)
    _check_pair("nt_xent", ("z1", "z2"), z1, z2)
    b = z1.shape[0]
    if b < 2:
        raise ValueError(f"nt_xent: need a batch of B >= 2 pairs to have negatives, got B={b}")
    with _autocast_off(z1):
        z = F.normalize(torch.cat(_full_precision(z1, z2)), dim=1)
        sim = z @ z.T / temperature
        self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
        sim = sim.masked_fill(self_mask, float("-inf"))
        idx = torch.arange(b, device=z.device)
        targets = torch.cat([idx + b, idx])
        return F.cross_entropy(sim, targets)
