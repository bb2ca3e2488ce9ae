"""Prompt templates for LLM controllers: one system prompt, one user template, the reflection history.

Reflection: the controller sees every past decision and how it turned out (layers and extra sparsity,
global gain, perplexity change, label, accepted or rolled back, its reasoning) within a character budget
(ControllerConfig.history_chars): the newest iterations in full, older ones as one line each, and the oldest as
one summary line when even those do not fit. The JSON schema of the answer comes from validate.decision_schema
(the same pydantic model that validates it).
"""
from __future__ import annotations

from .decision import MAX_EXTRA, MIN_EXTRA, Feedback, Observation

SYSTEM_PROMPT = f"""You control the pruning of a large language model, one iteration at a time.
Each iteration you choose prunable layers and, for each, extra_sparsity: the fraction of that
layer's REMAINING non-zero weights to remove now (between {MIN_EXTRA} and {MAX_EXTRA}). The lowest
Wanda scores |W|*||X|| of each output row are removed. After your step the held-out perplexity is
measured; if it rose more than the rollback threshold over the last accepted step, the step is undone.

Layer profile columns (z-scored across layers, lower = less sensitive, usually safer to prune):
  z_s: 10th percentile of the Wanda scores of the layer's remaining weights;
  z_g: mean |dL/dW| (gradient of the loss) over the layer's remaining weights.
A good decision: the layers with the lowest z_s + z_g (and a sparsity still below the others') get
the largest extra_sparsity, layers with high z_s or z_g get little or none; spread the work over
several layers; after a rollback, move the work to other layers or spread it more evenly; learn
from the history of your decisions; set stop_pruning to true only when the target is reached.

Answer with ONE JSON object and nothing else:
{{"reasoning": "<one short sentence>", "stop_pruning": false,
 "layer_decisions": [{{"layer": "<exact layer name from the table>", "extra_sparsity": 0.05}}, ...]}}"""

USER_TEMPLATE = """Rollback: a step is undone when perplexity rises more than {threshold:.0%} over the last accepted step{total_cap}.
No layer is pruned beyond {max_layer:.0%} sparsity. A layer's share of the global gain is weights x (1 - sparsity) x extra.
{scaling}

Iteration {iteration} (at most {max_iterations}; {iterations_left} left).
Global sparsity: current {current:.4f}, target {target:.4f}, still to prune {remaining:.4f}.
{pace_line}
Held-out perplexity: baseline {baseline_ppl:.3f}, current {current_ppl:.3f} ({ppl_vs_baseline:+.1%} vs baseline).

History of your decisions (newest first; "fallback" = the built-in policy decided because your answer was
invalid or the endpoint unavailable):
{history}

Layer profile ({n_rows} of {n_layers} layers, {total_weights} weights in all{same_size}, least sensitive first: sorted by z_s+z_g):
{header}
{table}
{errors}
Reply with the JSON decision{limit}."""

PACED = ("The loop multiplies all your extra_sparsity values by one common factor so that this step gains\n"
         "{pace_gain:.4f} global sparsity (the pace that reaches the target in time): what you decide is WHICH layers\n"
         "to prune and HOW MUCH MORE one gets than another, not the size of the step.")
UNPACED = "If your step would pass the target, every extra_sparsity is scaled down by the same factor."
PACE_LINE = ("Pace to reach the target in the iterations left: about {pace:.3f} extra_sparsity on every layer this "
             "iteration,\nor proportionally more on fewer layers (e.g. {pace_half:.3f} on half of them).")

# The settings of the run come first: they are the same every iteration, so a server that caches the prompt
# prefix (llama.cpp) evaluates them once.
FULL_ENTRIES = 3       # newest iterations shown in full (reasoning included) when the budget allows
REASONING_CHARS = 300  # of each full entry's reasoning


def _short_names(names) -> dict[str, str]:
    """Layer names without the dotted prefix they all share ('model.layers.3.mlp.up_proj' -> '3.mlp.up_proj')."""
    names = list(names)
    if len(names) < 2:
        return {n: n for n in names}
    parts = [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 1 and p[k] == parts[0][k] for p in parts):
        k += 1
    return {n: ".".join(p[k:]) for n, p in zip(names, parts)}


def _layers(fb: Feedback, short: dict[str, str], top: int) -> str:
    """'12 layers, extra 0.020-0.080 (mean 0.051); most: 3.mlp.up_proj 0.080, ...' (what was applied)."""
    extras = fb.applied
    if not extras:
        return f"{fb.n_layers} layers" if fb.n_layers else "no layer"
    vals = sorted(extras.values())
    out = f"{len(vals)} layers, extra {vals[0]:.3f}-{vals[-1]:.3f} (mean {sum(vals) / len(vals):.3f})"
    if top:
        most = sorted(extras.items(), key=lambda kv: -kv[1])[:top]
        out += "; most: " + ", ".join(f"{short.get(n, n)} {e:.3f}" for n, e in most)
    return out


def _who(fb: Feedback) -> str:
    return "fallback" if fb.source.endswith("fallback") else (fb.source or "?")


def _verdict(fb: Feedback) -> str:
    if fb.label == "stop":
        return "stopped"
    if fb.accepted:
        return f"{fb.label}, accepted"
    why = " (above the total perplexity cap)" if fb.rollback_reason == "total" else ""
    return f"{fb.label}, ROLLED BACK{why}"


def _full_entry(fb: Feedback, short: dict[str, str]) -> str:
    reasoning = " ".join(fb.reasoning.split())[:REASONING_CHARS] or "(none)"
    return (f"#{fb.iteration} [{_who(fb)}] {_layers(fb, short, 3)}; gain {fb.gain:+.4f}; perplexity "
            f"{fb.ppl_before:.3f} -> {fb.ppl_after:.3f} ({fb.ppl_change:+.1%}); {_verdict(fb)}.\n"
            f"   reasoning: {reasoning}")


def _line_entry(fb: Feedback, short: dict[str, str]) -> str:
    return (f"#{fb.iteration} [{_who(fb)}] {_layers(fb, short, 0)}; gain {fb.gain:+.4f}; ppl {fb.ppl_change:+.1%}; "
            f"{_verdict(fb)}")


def _summary(older: list[Feedback]) -> str:
    """One line for iterations that did not fit (oldest first in `older`)."""
    acc = [h for h in older if h.accepted]
    gain = sum(h.gain for h in acc)
    span = f"#{older[0].iteration}-#{older[-1].iteration}" if len(older) > 1 else f"#{older[0].iteration}"
    ppl = f"; perplexity {older[0].ppl_before:.3f} -> {acc[-1].ppl_after:.3f}" if acc else ""
    return (f"{span}: {len(older)} earlier iterations, {len(acc)} accepted, {len(older) - len(acc)} not "
            f"(rolled back or stopped), gain {gain:+.4f} in all{ppl}")


def render_history(history: list[Feedback], budget: int = 3000, names=()) -> str:
    """The decision history within `budget` characters, newest first (see the module docstring)."""
    if not history:
        return "(first iteration: no previous decision)"
    short = _short_names(names or {n for h in history for n in h.applied})
    lines, used = [], 0
    reserve = 200  # for the summary line of what does not fit
    for k, fb in enumerate(reversed(history)):
        entry = _full_entry(fb, short) if k < FULL_ENTRIES else _line_entry(fb, short)
        if used + len(entry) + 1 > budget - reserve and k < FULL_ENTRIES:
            entry = _line_entry(fb, short)  # a full entry that does not fit is compressed
        if used + len(entry) + 1 > budget - reserve:
            lines.append(_summary(history[: len(history) - k]))
            break
        lines.append(entry)
        used += len(entry) + 1
    return "\n".join(lines)


def render_user_prompt(obs: Observation, errors: list[str] | None = None, table_rows: int | None = None,
                       history_chars: int = 3000, max_layers: int | None = None) -> str:
    ranked = sorted(obs.rows, key=lambda r: (r["z_s"] + r["z_g"], r["layer"]))  # least sensitive first
    rows = ranked[:table_rows] if table_rows else ranked
    same = len({r["numel"] for r in obs.rows}) == 1  # blocks of one size: the column says nothing (prompt tokens)
    header = "layer | sparsity | z_s | z_g | z_s+z_g" if same else "layer | weights | sparsity | z_s | z_g | z_s+z_g"
    table = "\n".join(f"{r['layer']} | " + ("" if same else f"{r['numel']} | ") + f"{r['sparsity']:.3f} | "
                      f"{r['z_s']:+.2f} | {r['z_g']:+.2f} | {r['z_s'] + r['z_g']:+.2f}" for r in rows)
    err = ""
    if errors:
        err = ("\nYour previous answer was rejected: " + errors[-1] +
               "\nUse only layer names from the table, numbers in range, and exactly the three keys.\n")
    cap = obs.max_total_ppl_rise
    remaining = max(0.0, obs.target_sparsity - obs.current_sparsity)
    # extra on the remaining weights of every layer that gains remaining / iterations_left of global sparsity
    pace = remaining / max(1, obs.max_iterations - obs.iteration) / max(1e-9, 1 - obs.current_sparsity)
    paced = obs.pace_gain > 0
    return USER_TEMPLATE.format(
        scaling=PACED.format(pace_gain=obs.pace_gain) if paced else UNPACED,
        pace_line="" if paced else PACE_LINE.format(pace=pace, pace_half=min(2 * pace, 1.0)),
        iteration=obs.iteration, max_iterations=obs.max_iterations,
        iterations_left=obs.max_iterations - obs.iteration, current=obs.current_sparsity,
        target=obs.target_sparsity, remaining=remaining,
        baseline_ppl=obs.baseline_ppl, current_ppl=obs.current_ppl,
        ppl_vs_baseline=obs.current_ppl / obs.baseline_ppl - 1 if obs.baseline_ppl else 0.0,
        threshold=obs.rollback_threshold, total_cap=f", or ends more than {cap:.0%} above the baseline" if cap else "",
        history=render_history(obs.history, history_chars, obs.layer_names),
        n_rows=len(rows), n_layers=len(obs.rows), table=table, header=header, errors=err,
        same_size=f", {obs.rows[0]['numel']} in each" if same and obs.rows else "", max_layer=obs.max_layer_sparsity,
        total_weights=sum(r["numel"] for r in obs.rows),
        limit=f" (at most {max_layers} layers)" if max_layers else "")


def build_messages(obs: Observation, errors: list[str] | None = None, table_rows: int | None = None,
                   history_chars: int = 3000, max_layers: int | None = None) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": render_user_prompt(obs, errors, table_rows, history_chars, max_layers)}]
