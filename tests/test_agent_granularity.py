"""Block granularity of the controller's view (agent/granularity.py): rows summed per decoder block, z-scores
weighted by weights and re-standardised across blocks, a block decision expanded to every linear of the block."""
import pytest

from prunepilot.agent.controllers import BuiltinPolicy, GuardedController
from prunepilot.agent.decision import Feedback, Observation
from prunepilot.agent.granularity import BlockView, block_of

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
         "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.experts.3.up_proj"]


def _row(name, numel, alive, z_s, z_g):
    return {"layer": name, "numel": numel, "alive": alive, "sparsity": 1 - alive / numel, "s": 1.0, "g": 2.0,
            "z_s": z_s, "z_g": z_g}


def _obs(history=()):
    rows = [_row(NAMES[0], 100, 100, 1.0, 0.0), _row(NAMES[1], 300, 150, -1.0, 2.0),
            _row(NAMES[2], 100, 50, 3.0, 1.0), _row(NAMES[3], 100, 100, 1.0, -1.0)]
    return Observation(2, 10, 0.5, 0.25, rows, 11.0, 10.0, 0.15, history=list(history))


def test_block_of_names_the_decoder_block():
    assert block_of("model.layers.12.mlp.experts.5.up_proj") == "model.layers.12"
    assert block_of("transformer.h.0.attn.c_attn") == "transformer.h.0"
    assert block_of("lm_head") == "lm_head"


def test_block_rows_are_weighted_sums_and_restandardised_z():
    view = BlockView(NAMES)
    rows = {r["layer"]: r for r in view.rows(_obs().rows)}
    b0, b1 = rows["model.layers.0"], rows["model.layers.1"]
    assert (b0["numel"], b0["alive"], b1["numel"], b1["alive"]) == (400, 250, 200, 150)
    assert b0["sparsity"] == pytest.approx(150 / 400) and b1["sparsity"] == pytest.approx(50 / 200)
    # weighted means: z_s 0: (100*1 - 300*1) / 400 = -0.5, 1: (3 + 1) / 2 = 2 -> two values z-score to -1, +1
    assert (b0["z_s"], b1["z_s"]) == pytest.approx((-1.0, 1.0))
    # z_g 0: (0 + 600) / 400 = 1.5, 1: 0 -> +1, -1
    assert (b0["z_g"], b1["z_g"]) == pytest.approx((1.0, -1.0))
    assert [r["layer"] for r in view.rows(_obs().rows)] == ["model.layers.0", "model.layers.1"]  # by z_s


def test_history_is_shown_per_block():
    fb = Feedback(1, 0.1, 10.0, 10.5, 0.05, "good", True, applied={NAMES[0]: 0.1, NAMES[1]: 0.2, NAMES[2]: 0.05},
                  n_layers=3)
    shown = BlockView(NAMES).observe(_obs([fb]))
    assert shown.history[0].applied == pytest.approx({"model.layers.0": 0.15, "model.layers.1": 0.05})
    assert shown.history[0].n_layers == 2 and shown.layer_names == ["model.layers.0", "model.layers.1"]


class OneBlock:
    name = "scripted"

    def __init__(self):
        self.seen = None

    def propose(self, obs, errors=None):
        self.seen = obs
        return {"reasoning": "b1", "stop_pruning": False,
                "layer_decisions": [{"layer": "model.layers.1", "extra_sparsity": 0.1}]}


def test_guard_expands_a_block_decision_to_its_linears_and_rejects_linear_names():
    ctl = OneBlock()
    d = GuardedController(ctl, BuiltinPolicy(), granularity="block").decide(_obs())
    assert ctl.seen.layer_names == ["model.layers.0", "model.layers.1"]
    assert d.source == "scripted" and d.extras() == {NAMES[2]: 0.1, NAMES[3]: 0.1}
    # at linear granularity the same answer names an unknown layer: rejected, then the built-in policy decides
    d = GuardedController(OneBlock(), BuiltinPolicy(), invalid_retries=0).decide(_obs())
    assert d.source == "builtin-fallback" and set(d.extras()) == set(NAMES[:2] + NAMES[2:])
