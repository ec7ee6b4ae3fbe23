"""What a job's directory keeps on the coordinator: final.safetensors holds the
weights only (fedge.coordinator.checkpoint)."""

from __future__ import annotations

import numpy as np

from fedge.coordinator import checkpoint as ck


def test_the_final_model_is_written_without_the_strategy_state(tmp_path):
    c = ck.Checkpoint(weights=np.arange(4, dtype=np.float32), round=7, plan="p",
                      strategy_state={"m": np.ones(4), "v": np.ones(4)}, metrics={"x": 1})
    digest = ck.save_final(tmp_path, "j", c)
    final = ck.load_checkpoint(ck.final_path(tmp_path, "j"))
    assert digest == c.model_digest and final.strategy_state == {}
    assert (final.round, final.metrics) == (7, {"x": 1})
    assert c.strategy_state.keys() == {"m", "v"}  # the caller's checkpoint is left whole
