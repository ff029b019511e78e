"""Post-training pruning defenses, one file each: linf-prune with its l2/l1 ablations (norm_prune.py),
random-prune, fine-pruning and clp; core.py holds the path the mask-based ones share."""

from bdguard.registry import import_modules

import_modules(__name__, __path__)  # each file registers its defenses
