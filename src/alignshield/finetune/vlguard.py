"""VLGuard-style safety-data mixing (Zong et al., ICML 2024), the fine-tune-stage baseline of Huang et
al. (Lisa, NeurIPS 2024): ``guide_data_num`` safe pairs (harmful prompt, refusal) from the alignment
pool join the user's fine-tuning set, which is then trained on as plain SFT.

A data transformation only. The pairs are drawn without replacement (seeded by the run's seed), and
the training set is shuffled by the epoch sampler.

- ``mix: replace`` (default, the references': git-disl/Lisa train.py:166, git-disl/Antidote utils.py:252,
  git-disl/Booster utils.py:272 take (1 - p) * n - guide_data_num benign samples): the pairs REPLACE
  ``guide_data_num`` benign user examples (a seeded choice), so the set keeps exactly n examples and
  its round(p * n) harmful ones. Which user examples are benign comes from ``extra_data["user_harmful"]``
  (one bool per example, in train-set order), which the fine-tune stage passes.
- ``mix: add``: the pairs are ADDED, n + guide_data_num examples (git-disl/Vaccine train.py:166-169,
  whose two branches both keep (1 - p) * n benign samples).

The stage reports the user mix (``n``, ``n_harmful``, ``mix.jsonl``) as sampled; ``guide_examples``,
``user_examples`` (user examples trained on) and ``replaced_benign`` say what was trained.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from alignshield.config import MethodParams
from alignshield.finetune import FINETUNE_METHODS
from alignshield.finetune._common import alignment_pool
from alignshield.seeding import derive_seed
from alignshield.train import Trainer

class VLGuardParams(MethodParams):
    """VLGuard mixing. ``guide_data_num = 100`` is OUR default, sized for the bundled 500-pair pool (the
    reference scripts pass ``--guide_data_num`` per run); it must not exceed ``align.data.safety`` (nor,
    with ``mix: replace``, the benign user examples)."""

    guide_data_num: int = Field(100, gt=0)
    """Safety pairs from ``align.data.safety`` mixed into the fine-tuning set."""
    mix: Literal["replace", "add"] = "replace"
    """replace: the pairs take the place of as many benign user examples (n fixed, as Lisa / Antidote /
    Booster). add: they are added (n + guide_data_num, as Vaccine)."""


def user_harmful_flags(train_set: list, extra_data: dict) -> list[bool]:
    """Which user examples are harmful, from ``extra_data["user_harmful"]`` (the fine-tune stage passes it)."""
    flags = extra_data.get("user_harmful")
    if flags is None:
        raise ValueError("vlguard: mix=replace needs to know which user examples are benign "
                         "(extra_data['user_harmful']); use finetune.params.mix=add to add the safety pairs instead")
    if len(flags) != len(train_set):
        raise ValueError(f"vlguard: extra_data['user_harmful'] has {len(flags)} entries for {len(train_set)} "
                         "user examples")
    return [bool(f) for f in flags]


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
        user = list(train_set)
        self.replaced: list[int] = []
        """Indices (in the user set) of the benign examples the guide pairs replaced."""
        if params.mix == "replace":
            flags = user_harmful_flags(user, self.extra_data)
            benign = [i for i, h in enumerate(flags) if not h]
            if k > len(benign):
                raise ValueError(f"vlguard: guide_data_num={k} exceeds the {len(benign)} benign user examples it "
                                 "would replace (mix=replace); lower finetune.params.guide_data_num, raise "
                                 "finetune.n, or use finetune.params.mix=add")
            self.replaced = sorted(random.Random(derive_seed(seed, "vlguard-replace")).sample(benign, k))
            dropped = set(self.replaced)
            user = [t for i, t in enumerate(user) if i not in dropped]
        self.user_examples = len(user)
        self.examples = user + self.guide
        """The training set: the user examples kept, then the guide pairs (the epoch sampler shuffles)."""
        super().__init__(model, self.examples, args, params, seed=seed, extra_data=extra_data, **kwargs)

    def train(self):
        return super().train() | {"guide_examples": len(self.guide), "user_examples": self.user_examples,
                                  "replaced_benign": len(self.replaced), "mix": self.params.mix}
