"""What one decision of a local LLM controller costs, and whether it follows the profile.

Starts llama-cpp-python's OpenAI-compatible server on 127.0.0.1 with --gguf (default: Qwen2.5-Coder-1.5B-Instruct
from `prunepilot fetch-model`), and asks it --decisions times for a decision through the agent's own controller
stack (prompt, JSON schema, validation, re-asks, block granularity: prunepilot.agent.controllers.make_controller).
The observations come from a simulated run on a profile shaped like Qwen2.5-0.5B (24 blocks of q/k/v/o/gate/up/down
linears at their real sizes; block sensitivity high at both ends, plus noise; seeded): each valid decision is paced
and applied to the simulated sparsities like the loop does (agent.pacing.plan_step), a perplexity model raises the
held-out ppl by the gain weighted by the pruned layers' sensitivity, and a rise above the threshold is a rollback
the controller is told about. So the prompt the model reads grows a real history, as in a run; no model is pruned.

Per decision: valid or not (fallback), seconds, prompt / completion tokens (as the server reports them, re-asks
included), and profile agreement = the share of the decision's weight mass (extra x remaining weights) that falls
on the less sensitive half of the blocks by z_s + z_g (0.5 = blind; the built-in policy's share is printed too).

    python bench/controller_decisions.py --decisions 10 --out docs/bench/controller_decisions.md
"""
from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from agent_paper import SMALL_PROMPT, default_controller_gguf, missing_controller, start_server
from common import machine, md_table

from prunepilot.agent import AgentConfig
from prunepilot.agent.controllers import BuiltinPolicy, make_controller
from prunepilot.agent.decision import Feedback, Observation
from prunepilot.agent.granularity import block_of
from prunepilot.agent.pacing import Budget, pace_gain, plan_step
from prunepilot.agent.profile import Profile
from prunepilot.io import atomic_write_text

SHAPES = {"self_attn.q_proj": (896, 896), "self_attn.k_proj": (128, 896), "self_attn.v_proj": (128, 896),
          "self_attn.o_proj": (896, 896), "mlp.gate_proj": (4864, 896), "mlp.up_proj": (4864, 896),
          "mlp.down_proj": (896, 4864)}


class SimulatedRun:
    """The state an agent run would show its controller, on a made-up but Qwen2.5-0.5B-shaped profile."""

    def __init__(self, blocks: int, target: float, iterations: int, seed: int):
        rnd = random.Random(seed)
        self.names = [f"model.layers.{b}.{kind}" for b in range(blocks) for kind in SHAPES]
        self.numel = {n: math.prod(SHAPES[n.split(".", 3)[3]]) for n in self.names}
        self.zeros = dict.fromkeys(self.names, 0)
        mid = (blocks - 1) / 2
        block_sens = [1.5 * ((b - mid) / mid) ** 2 + rnd.gauss(0, 0.3) for b in range(blocks)]
        self.sens = {n: block_sens[int(n.split(".")[2])] + rnd.gauss(0, 0.2) for n in self.names}
        self.s = {n: math.exp(self.sens[n]) for n in self.names}
        self.g = {n: math.exp(self.sens[n] + rnd.gauss(0, 0.3)) for n in self.names}
        self.target, self.iterations, self.history = target, iterations, []
        self.baseline = self.ppl = 12.0

    def observe(self) -> Observation:
        total = sum(self.numel.values())
        current = sum(self.zeros.values()) / total
        rows = Profile(self.names, self.numel, self.zeros, self.s, self.g).rows()
        it = len(self.history)
        return Observation(it, self.iterations, self.target, current, rows, self.ppl, self.baseline, 0.15,
                           self.history[-1] if self.history else None, list(self.history), 0.9, None,
                           pace_gain(self.target - current, self.iterations - it, 0.2))

    def apply(self, obs: Observation, decision) -> None:
        step = plan_step(decision.extras(), Budget(self.numel, self.zeros, self.target, 0.9, 0.5), obs.pace_gain)
        total = sum(self.numel.values())
        gain = sum(e * (self.numel[n] - self.zeros[n]) for n, e in step.applied.items()) / total
        harm = sum(e * (self.numel[n] - self.zeros[n]) * math.exp(self.sens[n]) for n, e in step.applied.items())
        rise = math.exp(3.0 * harm / total) * (1 + obs.current_sparsity) - 1 - obs.current_sparsity
        ok = rise <= 0.15
        if ok:
            for n, e in step.applied.items():
                self.zeros[n] += int(e * (self.numel[n] - self.zeros[n]))
                self.s[n] *= 1 + e
        label = ("excellent" if rise <= 0.0375 else "good") if ok else "poor-rolled-back"
        self.history.append(Feedback(obs.iteration, gain, self.ppl, self.ppl * (1 + rise), rise, label, ok,
                                     decision.reasoning, decision.source, len(step.applied), step.applied,
                                     "" if ok else "step"))
        self.ppl = self.ppl * (1 + rise) if ok else self.ppl


def agreement(obs: Observation, decision) -> float:
    """Share of the decision's weight mass on the less sensitive half of the blocks (by z_s + z_g)."""
    by_block: dict[str, list[dict]] = {}
    for r in obs.rows:
        by_block.setdefault(block_of(r["layer"]), []).append(r)
    score = {b: sum((r["z_s"] + r["z_g"]) * r["numel"] for r in rs) / sum(r["numel"] for r in rs)
             for b, rs in by_block.items()}
    calm = set(sorted(score, key=score.get)[: len(score) // 2])
    alive = {r["layer"]: r["alive"] for r in obs.rows}
    mass = {n: e * alive[n] for n, e in decision.extras().items()}
    total = sum(mass.values())
    return sum(m for n, m in mass.items() if block_of(n) in calm) / total if total else float("nan")


@dataclass
class Asked:
    iteration: int
    valid: bool
    seconds: float
    prompt_tokens: int | None
    completion_tokens: int | None
    blocks: int
    agreement: float
    warning: str


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=default_controller_gguf())
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decisions", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=24)
    ap.add_argument("--target", type=float, default=0.45)
    ap.add_argument("--iterations", type=int, default=20, help="max_iterations the simulated run states")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per decision")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.gguf is None:
        raise missing_controller("--gguf")
    t = time.time()
    server = start_server(args.gguf, args.threads)
    started = time.time() - t
    try:
        cfg = AgentConfig(target_sparsity=args.target, max_iterations=args.iterations,
                          controller={"kind": "openai", "base_url": server.url, "model_name": "local",
                                      "timeout_s": args.timeout, "retries": 0, **SMALL_PROMPT})
        ctl, builtin = make_controller(cfg), BuiltinPolicy()
        sim, asked = SimulatedRun(args.blocks, args.target, args.iterations, args.seed), []
        for _ in range(args.decisions):
            obs = sim.observe()
            d = ctl.decide(obs)
            st, valid = d.stats, not d.source.endswith("fallback")
            asked.append(Asked(obs.iteration, valid, st["controller_s"], st.get("prompt_tokens"),
                               st.get("completion_tokens"), len({block_of(x.layer) for x in d.layer_decisions}),
                               agreement(obs, d) if valid else float("nan"), "; ".join(d.warnings)[:200]))
            print(asked[-1], flush=True)
            sim.apply(obs, d)
        from prunepilot.agent.validate import parse_decision

        obs0 = SimulatedRun(args.blocks, args.target, args.iterations, args.seed).observe()
        base = agreement(obs0, parse_decision(builtin.propose(obs0), obs0.layer_names, source="builtin"))
    finally:
        server.stop()
    write(args, asked, base, started)


def write(args, asked: list[Asked], builtin_agreement: float, started: float) -> None:
    valid = [a for a in asked if a.valid]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    rows = [[a.iteration, "yes" if a.valid else "no (fallback)", a.seconds, a.prompt_tokens, a.completion_tokens,
             a.blocks, a.agreement if a.valid else "-"] for a in asked]
    summary = (f"valid {len(valid)}/{len(asked)}; seconds per decision mean {mean([a.seconds for a in asked]):.1f} "
               f"(max {max(a.seconds for a in asked):.1f}); prompt tokens mean "
               f"{mean([a.prompt_tokens for a in asked if a.prompt_tokens]):.0f}, completion tokens mean "
               f"{mean([a.completion_tokens for a in asked if a.completion_tokens]):.0f}; profile agreement of the "
               f"valid decisions mean {mean([a.agreement for a in valid]):.2f} (0.5 = blind; built-in policy on the "
               f"first observation {builtin_agreement:.2f})")
    text = (f"# controller decisions: {Path(args.gguf).name}\n\n"
            + md_table(["iteration", "valid", "seconds", "prompt tokens", "completion tokens", "blocks named",
                        "profile agreement"], rows)
            + f"\n\n{summary}\n\nProtocol: llama-cpp-python server on 127.0.0.1, {args.threads} threads (started in "
            f"{started:.0f}s), agent controller settings {SMALL_PROMPT}, timeout {args.timeout:.0f}s per decision; "
            f"simulated Qwen2.5-0.5B-shaped profile ({args.blocks} blocks, seed {args.seed}), target {args.target}, "
            f"{args.iterations} iterations stated; {machine()}\n")
    print(text, flush=True)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
