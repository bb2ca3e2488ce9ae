"""Structured pruning: remove whole MLP channels and KV head groups, making the model physically smaller.

    pipeline.py  the registered structured pipeline: calibration passes, ranking (global or uniform), slicing
    budget.py    what `sparsity` counts, the cost of each unit, feasibility
    outcome.py   uniform widths into the config, GPU-alignment warning, the report
    methods.py   wanda_sp, flap, flap_iterative: how each scores channels and heads
    scores.py    streaming float32 moments, FLAP's fluctuation score, global and uniform selection
    slicing.py   keep given channels / experts / KV groups (GQA-consistent) of the engine layout's parts, bias
                 compensation, blocks shrunk to recorded widths
    saving.py    the per-layer widths format (prunepilot_widths.json); modeling.py saves and loads with it

Import the submodules directly (prunepilot.structured.saving ...); this package imports nothing eagerly.
"""
