"""The BlockPruner golden case (``/work/shared/fixtures/blockpruner-golden``): SmolLM2-135M, 12 steps.

About 1-2 hours on a 2-core CPU, so it runs only when asked: ``PRUNEKIT_GOLDEN=1 pytest -m slow
tests/methods/test_blockpruner_golden.py``. The windows are built from the raw file text, tokenised whole without
special tokens (4,096 ids, checked by hash), because the golden case was measured on exactly those ids.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit.data.windows import TokenWindows
from tests.conftest import requires_smollm2
from tests.methods.depth_helpers import schedule_of

GOLDEN = Path("/work/shared/fixtures/blockpruner-golden")
IDS_SHA256 = "11b7a3c5870434cb11820a3fc8e2fbf6cda6cef70e2c71b85dfe0bade08285c4"
EXPECTED = [  # (unit, calibration perplexity after removal); step 0 is the dense model
    (None, 16.8265), (("attn", 5), 17.1868), (("attn", 17), 17.7393), (("attn", 6), 18.3965),
    (("attn", 29), 19.1671), (("attn", 26), 20.0698), (("attn", 12), 21.3322), (("mlp", 16), 22.7636),
    (("attn", 22), 24.1595), (("attn", 25), 25.8151), (("mlp", 12), 27.9893), (("attn", 14), 30.9016),
    (("mlp", 13), 33.1364),
]
SHARES = {4: 0.02633, 8: 0.06581, 12: 0.11844}  # ratio_all after 4 / 8 / 12 steps


@pytest.mark.slow
@requires_smollm2
@pytest.mark.skipif(os.environ.get("PRUNEKIT_GOLDEN") != "1" or not GOLDEN.is_dir(),
                    reason="hours on CPU: set PRUNEKIT_GOLDEN=1 to run the BlockPruner golden case")
def test_blockpruner_reproduces_the_golden_schedule(smollm2, tmp_path):
    model, tokenizer = smollm2
    text = (GOLDEN / "calibration.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    assert hashlib.sha256(ids.numpy().astype(np.int64).tobytes()).hexdigest() == IDS_SHA256
    windows = TokenWindows(ids.view(8, 512), "calibration.txt", "all", 512, "none", "sequential", None, 4096)
    schedule = schedule_of("blockpruner", model, windows, blocks=12, state_path=str(tmp_path / "state.json"))
    assert [tuple(unit) for unit in schedule["order"]] == [unit for unit, _ in EXPECTED[1:]]
    # The golden values are rounded to 4 decimals and were measured in another environment.
    assert schedule["calibration_ppl"] == pytest.approx([ppl for _, ppl in EXPECTED], rel=5e-4)
    for steps, share in SHARES.items():
        assert schedule["ratio_all"][steps] == pytest.approx(share, abs=1e-5)
