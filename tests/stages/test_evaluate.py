"""Evaluate's size and parameter figures against a count by hand, and its accuracy against a
direct computation."""

import torch

from deploypipe.config import DataSpec
from deploypipe.data import load_data
from deploypipe.evaluation import parameter_count, state_bytes, top1_and_loss
from deploypipe.zoo import digits_cnn


def test_size_and_parameters_by_hand():
    m = digits_cnn()
    # convs 1*16*9, 16*32*9, 32*64*9 (no bias); BN weight+bias 2*(16+32+64); fc 64*10 + 10
    params = 1 * 16 * 9 + 16 * 32 * 9 + 32 * 64 * 9 + 2 * (16 + 32 + 64) + 64 * 10 + 10
    assert parameter_count(m) == params == 24_058
    # + BN running mean/var (float32) and num_batches_tracked (int64), Normalize mean/std (float32)
    assert state_bytes(m) == 4 * params + 4 * 2 * (16 + 32 + 64) + 8 * 3 + 4 * 2


def test_top1_and_loss_match_a_direct_computation():
    torch.manual_seed(0)
    m = digits_cnn().eval()
    test = load_data(DataSpec(source="digits")).test
    with torch.no_grad():
        logits = m(test.images)
    top1, loss = top1_and_loss(m, test, batch_size=37)  # batches that do not divide the set
    assert top1 == (logits.argmax(1) == test.labels).sum().item() / len(test)
    assert abs(loss - torch.nn.functional.cross_entropy(logits, test.labels).item()) < 1e-5
