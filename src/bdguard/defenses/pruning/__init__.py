"""Post-training pruning defenses, one file each: linf-prune with its l2/l1 ablations (norm_prune.py),
random-prune, fine-pruning and clp; core.py holds the path the mask-based ones share."""

from bdguard.defenses.pruning import clp, fine_pruning, norm_prune, random_prune  # noqa: F401 (registration)
