import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tuneoff.core.measure import current_memory_bytes
from tuneoff.training import dropout
from tuneoff.training.loop import return_freed_memory


def test_mask_drops_each_element_independently_with_probability_p():
    torch.manual_seed(0)
    n = 1_000_001  # not a multiple of 4: the last 64-bit draw is only partly used
    for p in (0.05, 0.5):
        drop = dropout.Dropout(p).train()
        x = torch.ones(n)
        out = drop(x)
        dropped = out == 0
        # kept elements are scaled like nn.Dropout's; the drop rate is p within 5 standard deviations
        assert torch.allclose(out[~dropped], torch.full_like(out[~dropped], 1 / (1 - p)))
        assert abs(dropped.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
        # the four elements drawn from one 64-bit number are independent of each other
        lanes = dropped[: n - 1].view(-1, 4).float()
        for i, j in ((0, 1), (1, 2), (2, 3), (0, 3)):
            both = (lanes[:, i] * lanes[:, j]).mean().item()
            assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / len(lanes)) ** 0.5


def test_gradient_is_the_mask_and_eval_is_identity():
    drop = dropout.Dropout(0.3).train()
    x = torch.randn(7, 33, requires_grad=True)
    out = drop(x)
    g = torch.randn_like(out)
    out.backward(g)
    kept = out != 0
    assert torch.allclose(x.grad, torch.where(kept, g / 0.7, 0.0))
    assert drop.eval()(x) is x and dropout.Dropout(0.0).train()(x) is x


def test_same_seed_same_mask():
    x = torch.ones(1000)
    torch.manual_seed(3)
    a = dropout.Dropout(0.1).train()(x)
    torch.manual_seed(3)
    assert torch.equal(a, dropout.Dropout(0.1).train()(x))


def test_cheaper_swaps_lora_dropout_and_restores_it(tiny_base):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    def drops():
        return [d for m in model.modules() for d in getattr(m, "lora_dropout", {}).values()]
    before = drops()
    model.eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    with dropout.cheaper(model):
        assert len(drops()) == len(before) > 0 and all(type(d) is dropout.Dropout and d.p == 0.1 for d in drops())
        assert not any(d.training for d in drops())  # the model's eval mode carries over
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, reference)
    assert all(a is b for a, b in zip(drops(), before)) and len(drops()) == len(before)


def test_return_freed_memory_shrinks_the_resident_set():
    if current_memory_bytes(torch.device("cpu")) is None:
        pytest.skip("no /proc/self/status")
    block = torch.ones(4 << 20, dtype=torch.uint8)
    del block  # freeing a mapped 4 MiB block lifts glibc's mmap threshold above it
    held = [torch.ones(2 << 20, dtype=torch.uint8) for _ in range(100)]  # 200 MiB, now on the heap
    del held[::2]  # 100 MiB of holes between live blocks: free, but still resident
    before = current_memory_bytes(torch.device("cpu"))
    return_freed_memory()
    after = current_memory_bytes(torch.device("cpu"))
    assert before - after > 50 << 20
