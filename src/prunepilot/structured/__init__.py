"""Structured pruning: remove whole MLP channels and KV head groups, making the model physically smaller.

    options.py        the structured methods' typed options (recipe structured:), one model per method kind
    methods.py        wanda_sp, flap, flap_iterative: how each scores channels and heads (their own contract)
    pipeline.py       the registered structured pipeline: calibration, expert removal, steps, report
    steps.py          the step pipeline: one statistics pass per step, then scoring, choosing, slicing
    observation.py    statistics gathering: the output projections' input moments, pooled or per domain
    candidates.py     scoring: each layer's removable units with the method's scores and their cost
    selection.py      choosing what to remove: uniform per-layer ratios or one global ranking, width rounding
                      (the streaming moments they score with: prunepilot/moments.py)
    removal.py        the physical removal (bias compensation) and the original indices each layer keeps
    expert_removal.py whole MoE experts removed first (expert_scores.py: frequency or REAP)
    budget.py         what `sparsity` counts, the cost of each unit, feasibility (Ledger)
    outcome.py        uniform widths into the config, GPU-alignment warning, the report
    scores.py         FLAP's fluctuation score, head / KV-group aggregation, standardisation
    slicing.py        keep given channels / experts / KV groups (GQA-consistent) of the engine layout's parts, bias
                      compensation, blocks shrunk to recorded widths
    saving.py         the per-layer widths format (prunepilot_widths.json); modeling.py saves and loads with it

Import the submodules directly (prunepilot.structured.saving ...); this package imports nothing eagerly.
"""
