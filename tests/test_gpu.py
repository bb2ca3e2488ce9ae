"""The same engine on a CUDA device (skipped without one): blocks visit the GPU one at a time and the results
match the CPU run."""
import pytest
import torch

from prunepilot.api import prune
from prunepilot.engine import ModelAdapter, blocks, capture_block_inputs, run_block
from prunepilot.eval.perplexity import perplexity_of_tokens, perplexity_sequential
from prunepilot.testing.tiny_models import tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

IDS = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def test_replay_on_the_gpu_equals_the_cpu_forward():
    model = tiny_model("qwen3")
    with torch.no_grad():
        ref = model(IDS, output_hidden_states=True).hidden_states
    ad = ModelAdapter(model)
    on_gpu = []
    for _ in blocks(ad, IDS, "cuda", batch_size=2):
        on_gpu.append([next(b.parameters()).device.type for b in ad.blocks])
    assert all(devs.count("cuda") == 1 for devs in on_gpu)  # one block on the device at a time
    inputs = capture_block_inputs(model, ad, IDS, "cuda", batch_size=2)
    for i, block in enumerate(ad.blocks[:-1]):  # the last hidden state has the final norm applied
        block.to("cuda")
        inputs.hidden = run_block(block, i, inputs)
        block.to("cpu")
        torch.testing.assert_close(torch.cat(inputs.hidden).cpu(), ref[i + 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4"), ("flap", "unstructured")])
def test_pruning_on_the_gpu_matches_the_cpu(method, pattern):
    recipe = {"method": method, "sparsity": 0.4, "pattern": pattern}
    cpu, gpu = tiny_model("llama"), tiny_model("llama")
    prune(cpu, {**recipe, "device": "cpu"}, calibration=IDS)
    prune(gpu, {**recipe, "device": "cuda"}, calibration=IDS)
    assert {p.device.type for p in gpu.parameters()} == {"cpu"}  # back where it was, not split
    for (name, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        assert a.shape == b.shape, name
        if method != "sparsegpt":  # masks from the same scores; SparseGPT's updates differ by float rounding
            assert torch.equal(a == 0, b == 0), name


def test_sequential_perplexity_on_the_gpu():
    model = tiny_model("llama")
    tokens = torch.randint(3, 128, (100,), generator=torch.Generator().manual_seed(1))
    ref = perplexity_of_tokens(model, tokens, seqlen=24)
    got = perplexity_sequential(model, tokens, seqlen=24, device="cuda")
    assert got["nll"] == pytest.approx(ref["nll"], rel=1e-4)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize("method", ["wanda", "flap"])
def test_a_model_on_the_gpu_stays_there(method):
    cpu, gpu = tiny_model("llama"), tiny_model("llama").to("cuda")
    recipe = {"method": method, "sparsity": 0.4}
    prune(cpu, {**recipe, "device": "cpu"}, calibration=IDS)
    prune(gpu, {**recipe, "device": "cuda"}, calibration=IDS)
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    assert {b.device.type for b in gpu.buffers()} == {"cuda"}
    with torch.no_grad():
        torch.testing.assert_close(gpu(IDS.cuda()).logits.cpu(), cpu(IDS).logits, rtol=1e-3, atol=1e-3)


def test_percentile_on_the_gpu_equals_the_cpu():
    from prunepilot.agent.profile import percentile

    x = torch.rand(3_000_001, generator=torch.Generator().manual_seed(2))
    for q in (0.0, 0.1, 0.5, 1.0):
        assert percentile(x.cuda(), q) == pytest.approx(percentile(x, q), rel=1e-6)


@pytest.mark.parametrize("mode", ["full", "blockwise"])
def test_gradients_leave_the_model_where_it_was(mode):
    from prunepilot.agent.profile import gradient_importance

    for where in ("cpu", "cuda"):
        model = tiny_model("llama").to(where)
        g = gradient_importance(model, ModelAdapter(model), IDS[:2], "cuda", mode)
        assert g and {p.device.type for p in model.parameters()} == {where}, (mode, where)
