"""Adapter and sequential engine: block discovery, exact replay, hooks removed, one block at a time."""
import pytest
import torch

from prunepilot.engine import ModelAdapter, blocks, capture_block_inputs, run_block
from prunepilot.methods.base import InputNormState
from prunepilot.errors import PrunepilotError
from prunepilot.testing.tiny_models import CONFIGS, tiny_model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_replaying_blocks_equals_full_forward(arch):
    model = tiny_model(arch)
    adapter = ModelAdapter(model)
    ids = torch.randint(3, 128, (4, 20))  # seq 20 > gemma/mistral sliding window 8
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states  # input of block i = ref[i]
    inputs = capture_block_inputs(model, adapter, ids, "cpu", batch_size=3)  # uneven batches: 3 + 1
    assert [h.shape[0] for h in inputs.hidden] == [3, 1]
    assert torch.equal(torch.cat(inputs.hidden), ref[0])
    for i, block in enumerate(adapter.blocks):
        inputs.hidden = run_block(block, i, inputs)
        if i + 1 < len(adapter.blocks):  # the last entry of hidden_states has the final norm applied
            torch.testing.assert_close(torch.cat(inputs.hidden), ref[i + 1], rtol=0, atol=1e-5)
    # the stubs are gone: the model still runs normally
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids).logits)
    assert all("forward" not in vars(b) for b in adapter.blocks)


def test_gemma3_blocks_get_their_own_mask_kind():
    model = tiny_model("gemma3")
    adapter = ModelAdapter(model)
    inputs = capture_block_inputs(model, adapter, torch.randint(3, 128, (1, 20)), "cpu")
    kinds = model.config.layer_types
    masks = [inputs.kwargs[0][i]["attention_mask"] for i in range(len(kinds))]
    for i, kind in enumerate(kinds):  # sliding and full attention layers receive different masks
        same_kind = [j for j, k in enumerate(kinds) if k == kind]
        assert all(torch.equal(masks[i], masks[j]) for j in same_kind)
    if len(set(kinds)) > 1:
        a, b = kinds.index("sliding_attention"), kinds.index("full_attention")
        assert not torch.equal(masks[a], masks[b])


def test_adapter_linears_include_ignore_and_geometry():
    model = tiny_model("qwen3")
    ad = ModelAdapter(model)
    names = list(ad.linears(1))
    assert names == [f"model.layers.1.{n}" for n in
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert list(ModelAdapter(model, include=[r"mlp\."]).linears(0)) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert "model.layers.0.self_attn.q_proj" not in ModelAdapter(model, ignore=["q_proj"]).linears(0)
    g = ad.attention_geometry()
    assert (g.num_heads, g.num_kv_heads, g.head_dim, g.group_size) == (4, 2, 32, 2)  # head_dim from config
    with pytest.raises(PrunepilotError, match="pattern"):
        ModelAdapter(model, include=["("])


def test_unknown_architecture_is_a_clear_error():
    class NotAnLLM(torch.nn.Module):
        config = type("C", (), {"model_type": "mystery"})()

    with pytest.raises(PrunepilotError, match="unsupported architecture.*mystery"):
        ModelAdapter(NotAnLLM())


def test_block_pass_moves_one_block_at_a_time_and_removes_hooks():
    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    seen = []
    for blk in blocks(adapter, torch.randint(3, 128, (2, 16)), "cpu", states=lambda n, m: InputNormState(
            m.in_features, "cpu")):
        seen.append(blk.index)
        assert blk.module is adapter.blocks[blk.index] and set(blk.states) == set(adapter.linears(blk.index))
        assert all(st.n == 2 * 16 for st in blk.states.values())  # every token of both samples was seen
        assert all(not m._forward_hooks for m in blk.linears.values())
    assert seen == [0, 1, 2]
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("outputs", ["pruned", "dense"])
def test_block_pass_feeds_pruned_or_dense_outputs_to_the_next_block(outputs):
    """outputs="pruned": what the body did to a block shapes the next block's inputs; "dense": the statistics
    pass sees the unpruned model throughout. Either way the last hidden states are the replayed forward."""
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 16))
    adapter = ModelAdapter(model)
    inputs_seen = []
    run = blocks(adapter, ids, "cpu", states=lambda n, m: InputNormState(m.in_features, "cpu"), outputs=outputs)
    for blk in run:
        inputs_seen.append(torch.cat(blk.inputs.hidden).clone())
        with torch.no_grad():
            blk.module.mlp.down_proj.weight.mul_(0.5)  # "prune" every block after its statistics were taken
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # the model as it is now (all pruned)
    block_inputs_of_pruned = [hidden[i] for i in range(3)]
    if outputs == "pruned":
        for got, want in zip(inputs_seen, block_inputs_of_pruned):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(inputs_seen[2], block_inputs_of_pruned[2], atol=1e-4)
        with torch.no_grad():
            for blk_module in adapter.blocks:
                blk_module.mlp.down_proj.weight.mul_(2.0)  # undo: the dense model's hidden states
            dense = model(ids, output_hidden_states=True).hidden_states
        for got, want in zip(inputs_seen, dense):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_entry_points_restore_the_callers_placement():
    """The engine moves the embedding stage and blocks to the compute device; every public entry point records
    where each tensor was and puts it back. A CPU-only machine has one device, so this checks the record and
    the wiring; tests/test_gpu.py checks the CUDA round trip (a CPU model pruned on the GPU comes back whole
    on the CPU, a GPU model stays on the GPU)."""
    from prunepilot.agent.loop import run_agent
    from prunepilot.api import prune
    from prunepilot.engine.placement import kept_placement, tensor_devices
    from prunepilot.eval.perplexity import perplexity_sequential

    model = tiny_model("llama")
    where = tensor_devices(model)
    n_tensors = len(list(model.named_parameters(remove_duplicate=False))) + len(list(model.named_buffers()))
    assert len(where) == n_tensors and "b:model.rotary_emb.inv_freq" in where
    head = model.lm_head.weight
    with kept_placement(model):
        model.lm_head.weight.data = model.lm_head.weight.data.clone()
    assert model.lm_head.weight is head and tensor_devices(model) == where
    for fn in (prune, perplexity_sequential, run_agent):  # structured methods run inside prune
        assert fn.__wrapped__.__name__ == fn.__name__, fn  # decorated with keeps_placement


def test_an_error_inside_an_entry_point_is_not_hidden_by_the_placement_restore(monkeypatch):
    from prunepilot.engine import placement

    def broken_restore(model, where):
        raise RuntimeError("CUDA out of memory while moving back")

    monkeypatch.setattr(placement, "restore_devices", broken_restore)

    @placement.keeps_placement
    def fails(model):
        raise ValueError("the real error")

    with pytest.raises(ValueError, match="the real error"):
        fails(tiny_model("llama"))


def test_linears_reading_the_same_input_share_one_state_fed_once():
    from prunepilot.methods.sparsegpt import HessianState

    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    ids = torch.randint(3, 128, (3, 16))
    for blk in blocks(adapter, ids, "cpu", states=lambda n, m: HessianState(m.in_features, "cpu")):
        p = f"{adapter.block_name(blk.index)}."
        st = blk.states
        assert st[p + "self_attn.q_proj"] is st[p + "self_attn.k_proj"] is st[p + "self_attn.v_proj"]
        assert st[p + "mlp.gate_proj"] is st[p + "mlp.up_proj"]
        assert len({id(s) for s in st.values()}) == 4  # qkv, o, gate/up, down
        assert all(s.n == 3 * 16 for s in st.values())  # every token once, not once per sharing linear
