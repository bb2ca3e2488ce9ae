"""Structured pruning: remove whole MLP channels and KV head groups, making the model physically smaller.

    pipeline.py  the registered structured pipeline: calibration passes, ranking (global or uniform), slicing
    budget.py    what `sparsity` counts, the cost of each unit, feasibility
    outcome.py   uniform widths into the config, GPU-alignment warning, the report
    methods.py   wanda_sp, flap, flap_iterative: how each scores channels and heads
    scores.py    streaming float32 moments, FLAP's fluctuation score, global and uniform selection
    slicing.py   keep given channels / KV groups (GQA-consistent), bias compensation, per-layer widths
    saving.py    save_pruned / load_pruned (plain transformers checkpoint or prunepilot_widths.json)

Import the submodules directly (prunepilot.structured.saving ...); this package imports nothing eagerly.
"""
