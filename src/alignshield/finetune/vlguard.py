"""VLGuard-style safety-data mixing (Zong et al., ICML 2024), the fine-tune-stage
baseline of Huang et al. (Lisa, NeurIPS 2024): ``guide_data_num`` safe pairs (harmful prompt, refusal)
from the alignment pool are added to the user's fine-tuning set, which is then trained on as plain SFT.

A data transformation only: the trainer's training set becomes user mix + safety examples (drawn
without replacement, seeded by the run's seed), shuffled together by the epoch sampler. The user
mix (``n``, ``n_harmful``, ``mix.jsonl``) is reported unchanged; ``guide_examples`` says how many
safety pairs were added.
"""

from __future__ import annotations

import random

from pydantic import Field

from alignshield.config import MethodParams
from alignshield.finetune import FINETUNE_METHODS
from alignshield.finetune._common import alignment_pool
from alignshield.seeding import derive_seed
from alignshield.train import Trainer


class VLGuardParams(MethodParams):
    """VLGuard mixing. ``guide_data_num = 100`` is OUR default, sized for the bundled 500-pair pool (the
    Lisa reference passes ``--guide_data_num`` per script); it must not exceed ``align.data.safety``."""

    guide_data_num: int = Field(100, gt=0)
    """Safety pairs from ``align.data.safety`` mixed into the fine-tuning set."""


@FINETUNE_METHODS.register("vlguard")
class VLGuardTrainer(Trainer):
    Params = VLGuardParams

    def __init__(self, model, train_set, args, params, *, seed, extra_data=None, **kwargs):
        self.extra_data = extra_data or {}
        pool = alignment_pool(self, "vlguard")
        k = params.guide_data_num
        if k > len(pool):
            raise ValueError(f"vlguard: guide_data_num={k} exceeds the {len(pool)} pairs of align.data.safety; "
                             "lower finetune.params.guide_data_num or enlarge the pool")
        self.guide = [pool[i] for i in sorted(random.Random(derive_seed(seed, "vlguard-guide")).sample(range(len(pool)), k))]
        self.user_examples = len(train_set)
        super().__init__(model, list(train_set) + self.guide, args, params, seed=seed, extra_data=extra_data, **kwargs)

    def train(self):
        return super().train() | {"guide_examples": len(self.guide), "user_examples": self.user_examples}
