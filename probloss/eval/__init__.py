"""Evaluation: metrics on tensors, the stability tracker, and ``evaluate`` for a dual encoder.

    from probloss.eval import evaluate, StabilityTracker
    metrics = evaluate(model, loss, eval_set, tokenizer, classnames=class_names())   # {"val/i2t_r@1": ...}
    metrics = evaluate(model, loss, test_set, tokenizer, classnames=class_names(), prefix="test")  # "test/..."
"""

from probloss.eval.dual_encoder import (
    encode_captions, encode_images, encode_texts, evaluate, fill_template, image_sigma_vs_noise, paired_scores,
    score_matrix, sigma_of,
)
from probloss.eval.metrics import (
    alignment, average_ranks, binned_means, effective_rank, modality_gap, multi_positive_ranks, ols,
    pair_probe_accuracy, partial_spearman, participation_ratio, percentile_ranks, plausible_ranking, positive_ranks,
    retrieval_recall, risk_coverage, same_group, spearman, tie_averaged, uniformity, zeroshot_accuracy,
)
from probloss.eval.stability import StabilityTracker, params_finite

__all__ = [
    "StabilityTracker", "alignment", "average_ranks", "binned_means", "effective_rank", "encode_captions",
    "encode_images", "encode_texts", "evaluate", "fill_template", "image_sigma_vs_noise", "modality_gap",
    "multi_positive_ranks", "ols",
    "pair_probe_accuracy", "paired_scores", "params_finite", "partial_spearman", "participation_ratio",
    "percentile_ranks", "plausible_ranking", "positive_ranks", "retrieval_recall", "risk_coverage",
    "same_group", "score_matrix", "sigma_of", "spearman", "tie_averaged", "uniformity", "zeroshot_accuracy",
]
