"""Structured pruning: remove whole MLP channels and KV head groups, making the model physically smaller.

    slicing.py   keep given channels / KV groups (GQA-consistent), bias compensation, per-layer widths
    scores.py    streaming float32 moments, Wanda-sp / FLAP scores, global and uniform selection
    methods.py   registered methods: wanda_sp, flap, flap_iterative (kind = "structured")
    api.py       prune_structured(model, recipe, method, tokenizer, calibration) -> PruneReport
    saving.py    save_pruned / load_pruned (plain transformers checkpoint or prunepilot_widths.json)
    speed.py     measure_speed: prefill / decode tokens per second

Import the submodules directly (prunepilot.structured.saving ...); this package imports nothing eagerly.
"""
