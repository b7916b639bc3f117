"""core/noise.py: per-sample normal draws (row b from generator b, on the generator's device)."""

import pytest
import torch

from gensample.core.noise import normal, normal_blocks, normal_rows


def _gens(seeds, device="cpu"):
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def test_rows_come_from_their_own_generator_whatever_the_batch():
    z = normal_rows(_gens([3, 5, 7]), (2, 4))
    assert z.shape == (3, 2, 4) and z.dtype == torch.float32
    for b, s in enumerate([3, 5, 7]):
        assert torch.equal(z[b], torch.randn(2, 4, generator=torch.Generator().manual_seed(s)))
    assert torch.equal(normal_rows(_gens([5]), (2, 4))[0], z[1])  # a sample's noise does not depend on the batch


def test_blocks_are_consecutive_rows_of_one_generator():
    z = normal_blocks(_gens([1, 2]), 6, (5,), dtype=torch.float64)
    assert z.shape == (6, 5) and z.dtype == torch.float64
    ref = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(z[3:], ref)
    with pytest.raises(ValueError, match="multiple of the number of generators"):
        normal_blocks(_gens([1, 2]), 5, (5,))


def test_single_draw_and_device_move():
    g = torch.Generator().manual_seed(0)
    z = normal((3,), g, device="cpu", dtype=torch.float64)
    assert torch.equal(z, torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))


@pytest.mark.gpu
def test_cuda_generators_draw_on_the_gpu():
    z = normal_rows(_gens([0, 1], "cuda"), (4,))
    assert z.device.type == "cuda"
    assert torch.equal(z[1], torch.randn(4, generator=torch.Generator("cuda").manual_seed(1), device="cuda"))
    z_cpu = normal_rows(_gens([0, 1]), (4,), device="cuda")  # CPU generators: the CPU numbers, moved
    assert z_cpu.device.type == "cuda" and torch.equal(z_cpu.cpu(), normal_rows(_gens([0, 1]), (4,)))
