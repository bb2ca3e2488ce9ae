"""Shared pieces of the agent tests: scripted controllers, tiny configs and data, observations."""
import json

import torch

from prunepilot.agent import AgentConfig
from prunepilot.agent.decision import Observation
from prunepilot.engine import ModelAdapter, weight_2d


class Killed(BaseException):
    """Simulates the process being killed (not an Exception: the guard must not swallow it)."""


class Scripted:
    """Controller replaying scripted outputs (dicts, strings, or callables of the observation)."""
    name = "scripted"

    def __init__(self, outputs=(), then=None, kill_at=None):
        self.outputs, self.then, self.kill_at = list(outputs), then, kill_at
        self.observations, self.errors = [], []

    def propose(self, obs, errors=None):
        self.observations.append(obs)
        self.errors.append(list(errors or []))
        if self.kill_at is not None and len(self.observations) > self.kill_at:
            raise Killed
        if self.outputs:
            out = self.outputs.pop(0)
        elif self.then is not None:
            out = self.then
        else:
            out = {"reasoning": "done", "stop_pruning": True, "layer_decisions": []}
        return out(obs) if callable(out) else out


def send_json(handler, status: int, data: bytes) -> None:
    """A complete JSON response from a test server's request handler."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def all_layers(extra):
    return lambda obs: {"reasoning": f"all at {extra}", "stop_pruning": False,
                        "layer_decisions": [{"layer": n, "extra_sparsity": extra} for n in obs.layer_names]}


def tiny_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (4, 32), generator=g), torch.randint(3, 128, (128,), generator=g)


def tiny_cfg(**kw):
    base = dict(target_sparsity=0.5, eval_seqlen=32, eval_tokens=128, save_model=False, device="cpu",
                grad_samples=2, max_iterations=10)
    base.update(kw)
    return AgentConfig(**base)


def masks_of(model):
    return {n: weight_2d(m) == 0 for n, m in ModelAdapter(model).all_linears().items()}


def obs_for(names, target=0.5, current=0.0):
    rows = [{"layer": n, "numel": 100, "alive": 100, "sparsity": 0.0, "s": 1.0 + k, "g": 1.0, "z_s": 0.0,
             "z_g": 0.0} for k, n in enumerate(names)]
    return Observation(0, 10, target, current, rows, 10.0, 10.0, 0.15)


NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]

# a valid reply, and one invalid reply per kind of mistake (validator and guard tests)
GOOD = {"reasoning": "ok", "stop_pruning": False,
        "layer_decisions": [{"layer": NAMES[0], "extra_sparsity": 0.05}]}


def reply_with(**kw):
    """GOOD with some fields replaced, as the JSON text a controller would send."""
    return json.dumps({**GOOD, **kw})


BAD = {
    "not json": "I think we should prune more",
    "truncated json": '{"reasoning": "x", "stop_pruning": false, "layer_decisions": [',
    "array": json.dumps([GOOD]),
    "missing key": json.dumps({"reasoning": "x", "stop_pruning": False}),
    "extra key": reply_with(exec="import os"),
    "reasoning type": reply_with(reasoning=3),
    "stop as string": reply_with(stop_pruning="false"),
    "stop as int": reply_with(stop_pruning=0),
    "decisions not list": reply_with(layer_decisions={"layer": NAMES[0], "extra_sparsity": 0.05}),
    "item not object": reply_with(layer_decisions=[NAMES[0]]),
    "item extra key": reply_with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": 0.05, "x": 1}]),
    "unknown layer": reply_with(layer_decisions=[{"layer": "model.layers.9.mlp.down_proj", "extra_sparsity": 0.05}]),
    "layer not string": reply_with(layer_decisions=[{"layer": 0, "extra_sparsity": 0.05}]),
    "duplicate layer": reply_with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": 0.05}] * 2),
    "too large": reply_with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": 0.5}]),
    "too small": reply_with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": 0.001}]),
    "negative": reply_with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": -0.05}]),
    "string number": reply_with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": "0.05"}]),
    "bool number": reply_with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": True}]),
    "nan": reply_with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": float("nan")}]),
    "nothing to do": reply_with(layer_decisions=[]),
}
