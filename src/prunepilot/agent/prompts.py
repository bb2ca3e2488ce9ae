"""Prompt templates for LLM controllers: one system prompt, one user template, one JSON schema."""
from __future__ import annotations

from .decision import MAX_EXTRA, MIN_EXTRA, Observation

SYSTEM_PROMPT = f"""You control the pruning of a large language model, one iteration at a time.
Each iteration you choose prunable linear layers and, for each, extra_sparsity: the fraction of that
layer's REMAINING non-zero weights to remove now (between {MIN_EXTRA} and {MAX_EXTRA}). The lowest
Wanda scores |W|*||X|| of each output row are removed. After your step the held-out perplexity is
measured; if it rose more than the rollback threshold over the last accepted step, the step is undone.

Layer profile columns (z-scored across layers, lower = less sensitive, usually safer to prune):
  z_s: 10th percentile of the Wanda scores of the layer's remaining weights;
  z_g: mean |dL/dW| (gradient of the loss) over the layer's remaining weights.
Guidelines: prune layers with low z_s and low z_g harder; spread the work over many layers; take
smaller steps after a rollback or a large perplexity rise; approach the target without overshooting;
set stop_pruning to true when the target is reached or further pruning would hurt too much.

Answer with ONE JSON object and nothing else:
{{"reasoning": "<one short paragraph>", "stop_pruning": false,
 "layer_decisions": [{{"layer": "<exact layer name from the table>", "extra_sparsity": 0.05}}, ...]}}"""

USER_TEMPLATE = """Iteration {iteration} (at most {max_iterations}; {iterations_left} left).
Global sparsity: current {current:.4f}, target {target:.4f}, still to prune {remaining:.4f}.
Held-out perplexity: baseline {baseline_ppl:.3f}, current {current_ppl:.3f} ({ppl_vs_baseline:+.1%} vs baseline).
Rollback threshold: {threshold:.0%} perplexity rise over the last accepted step.
No layer is pruned beyond {max_layer:.0%} sparsity; if your step would pass the target, every extra_sparsity
is scaled down by the same factor. A layer's share of the global gain is weights x (1 - sparsity) x extra.

Feedback on your last decision:
{feedback}

Recent iterations (iteration | gain | ppl change | label | source):
{history}

Layer profile ({n_rows} of {n_layers} layers, {total_weights} weights in all, sorted by z_s ascending):
layer | weights | sparsity | z_s | z_g
{table}
{errors}
Reply with the JSON decision."""


def _feedback(obs: Observation) -> str:
    fb = obs.last
    if fb is None:
        return "(first iteration: no previous decision)"
    verdict = "accepted" if fb.accepted else "ROLLED BACK (weights restored)"
    whose = ("The built-in policy made that decision (your answer was invalid or the endpoint unavailable); "
             "its reasoning" if fb.source.endswith("fallback") else "Your reasoning then")
    return (f"iteration {fb.iteration}: label {fb.label}, {verdict}; global sparsity gain {fb.gain:+.4f}; "
            f"perplexity {fb.ppl_before:.3f} -> {fb.ppl_after:.3f} ({fb.ppl_change:+.1%}).\n"
            f"{whose}: {fb.reasoning[:600] or '(none)'}")


def render_user_prompt(obs: Observation, errors: list[str] | None = None, table_rows: int | None = None) -> str:
    rows = obs.rows[:table_rows] if table_rows else obs.rows
    table = "\n".join(f"{r['layer']} | {r['numel']} | {r['sparsity']:.3f} | {r['z_s']:+.2f} | {r['z_g']:+.2f}"
                      for r in rows)
    hist = obs.history[-8:]
    history = "\n".join(f"{h.iteration} | {h.gain:+.4f} | {h.ppl_change:+.1%} | {h.label} | {h.source}"
                        for h in hist) or "(none)"
    err = ""
    if errors:
        err = ("\nYour previous answer was rejected: " + errors[-1] +
               "\nUse only layer names from the table, numbers in range, and exactly the three keys.\n")
    return USER_TEMPLATE.format(
        iteration=obs.iteration, max_iterations=obs.max_iterations,
        iterations_left=obs.max_iterations - obs.iteration, current=obs.current_sparsity,
        target=obs.target_sparsity, remaining=max(0.0, obs.target_sparsity - obs.current_sparsity),
        baseline_ppl=obs.baseline_ppl, current_ppl=obs.current_ppl,
        ppl_vs_baseline=obs.current_ppl / obs.baseline_ppl - 1 if obs.baseline_ppl else 0.0,
        threshold=obs.rollback_threshold, feedback=_feedback(obs), history=history,
        n_rows=len(rows), n_layers=len(obs.rows), table=table, errors=err, max_layer=obs.max_layer_sparsity,
        total_weights=sum(r["numel"] for r in obs.rows))


def build_messages(obs: Observation, errors: list[str] | None = None, table_rows: int | None = None) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": render_user_prompt(obs, errors, table_rows)}]


def decision_schema(layer_names: list[str] | None = None) -> dict:
    """JSON schema of a decision, for OpenAI-style `response_format` structured output."""
    layer = {"type": "string"} if not layer_names else {"type": "string", "enum": list(layer_names)}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["reasoning", "stop_pruning", "layer_decisions"],
        "properties": {
            "reasoning": {"type": "string"},
            "stop_pruning": {"type": "boolean"},
            "layer_decisions": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["layer", "extra_sparsity"],
                "properties": {"layer": layer,
                               "extra_sparsity": {"type": "number", "minimum": MIN_EXTRA, "maximum": MAX_EXTRA}}}},
        },
    }
