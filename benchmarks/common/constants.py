"""Paths, the benchmark issue's fixed sizes and its targets."""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")
BEAUTY_RAW = os.path.join(SHARED_DATA, "amazon_beauty")
BEAUTY_NUM_ITEMS = 12101

# The sizes fixed by the benchmark issue (BERT4Rec on Beauty).
ISSUE_SIZES = dict(hidden=64, num_layers=2, num_heads=2, mlp_dim=256,
                   max_len=50, batch_size=256, mask_prob=0.2,
                   dropout_rate=0.2)

# The issue's targets: figure name -> (minimum ratio ours / RecBole, text).
TARGETS = {
    "train_padded_seq_per_s": (1.5, ">= 1.5x RecBole seq/s, padded"),
    "train_packed_interactions_per_s": (3.0, ">= 3x RecBole real "
                                        "interactions/s, packed"),
    "eval_users_per_s": (3.0, ">= 3x RecBole users/s"),
}
MFU_TARGET = 0.5
