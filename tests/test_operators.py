"""Forward operators for inverse problems (docs/stsl.md, "What is here")."""

import numpy as np
import pytest
import torch

from gensample.samplers.operators import (
    AvgPoolSR, BicubicSR, MatrixOperator, bicubic_resize_matrix, box_inpaint, make_operator, motion_kernel, random_inpaint,
)

IMAGE_TASKS = ["inpaint-random", "inpaint-box", "sr-bicubic", "sr-avgpool", "gblur", "mblur"]


@pytest.fixture
def matrix_file(tmp_path):
    a = np.random.default_rng(0).normal(size=(5, 64))
    path = tmp_path / "A.npy"
    np.save(path, a)
    return f"matrix:{path}"


@pytest.mark.parametrize("task", IMAGE_TASKS + ["matrix"])
def test_adjoint_identity(task, matrix_file):
    """<A x, y> = <x, A^T y> in float64 for random x, y (true adjoint)."""
    op = make_operator(matrix_file if task == "matrix" else task, (1, 8, 8), seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randn(4, *op.out_shape, generator=g, dtype=torch.float64)
    lhs = (op(x) * y).flatten(1).sum(1)
    rhs = (x * op.adjoint(y)).flatten(1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("task", IMAGE_TASKS)
def test_matrix_matches_forward(task):
    op = make_operator(task, (1, 8, 8), seed=1)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    A = op.matrix()
    torch.testing.assert_close(x.reshape(3, -1) @ A.T, op(x).reshape(3, -1))


def test_reference_backprojection_is_not_the_adjoint_for_sr_and_blur():
    """The DPS/PSLD code's A^T is nearest upsampling (SR) / identity (blur): not adjoints (sec. 8)."""
    y = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    sr = BicubicSR((1, 8, 8), 2)
    assert not torch.allclose(sr.back_project(y), sr.adjoint(y))
    torch.testing.assert_close(sr.back_project(y), y.repeat_interleave(2, -1).repeat_interleave(2, -2))
    pool = AvgPoolSR((1, 8, 8), 2)  # our extra: a true adjoint exists and is used
    torch.testing.assert_close(pool.back_project(y), pool.adjoint(y))


def test_bicubic_rows_sum_to_one_and_are_antialiased():
    m = bicubic_resize_matrix(16, 4)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
    # the stretched kernel (support 4 * factor) touches more than 4 input pixels per output
    assert (np.abs(m) > 1e-12).sum(1).min() > 4
    const = torch.full((1, 3, 16, 16), 0.3, dtype=torch.float64)
    torch.testing.assert_close(BicubicSR((3, 16, 16), 4)(const), torch.full((1, 3, 4, 4), 0.3, dtype=torch.float64))


def test_box_hole_has_exact_size_and_is_seeded():
    a, b = box_inpaint((3, 32, 32), 8, seed=0), box_inpaint((3, 32, 32), 8, seed=0)
    assert int((a.mask == 0).sum()) == 64
    assert torch.equal(a.mask, b.mask)
    positions = {box_inpaint((3, 32, 32), 8, seed=s).mask.argmin().item() for s in range(10)}
    assert len(positions) > 1  # the corner is random across seeds
    rows = (a.mask == 0).any(1).nonzero().flatten()
    assert rows.min() >= min(16, (32 - 8) // 4)


def test_random_inpaint_fraction_and_channel_sharing():
    op = random_inpaint((3, 10, 10), missing=0.4, seed=2)
    assert int((op.mask == 0).sum()) == 40
    y = op(torch.ones(1, 3, 10, 10, dtype=torch.float64))
    assert torch.equal(y[0, 0], y[0, 1]) and torch.equal(y[0, 1], y[0, 2])
    frac = [(random_inpaint((1, 16, 16), seed=s).mask == 0).double().mean().item() for s in range(20)]
    assert 0.29 <= min(frac) and max(frac) <= 0.71  # default U(0.3, 0.7)


def test_measurement_noise_is_seeded_and_masked():
    op = random_inpaint((1, 8, 8), missing=0.5, seed=0)
    x = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    y1, y2 = op.measure(x, 0.1, gens()), op.measure(x, 0.1, gens())
    assert torch.equal(y1, y2)
    assert not torch.equal(y1[0], y1[1])
    assert (y1[:, :, op.mask == 0] == 0).all()  # missing entries stay zero
    assert 0.05 < y1[:, :, op.mask == 1].std() < 0.2
    assert torch.equal(op.measure(x, 0.0), op(x))


def test_motion_kernel_normalised_and_seeded():
    k1, k2, k3 = motion_kernel(9, 0.5, seed=0), motion_kernel(9, 0.5, seed=0), motion_kernel(9, 0.5, seed=1)
    assert abs(k1.sum().item() - 1) < 1e-12 and (k1 >= 0).all()
    assert torch.equal(k1, k2) and not torch.equal(k1, k3)


def test_gaussian_blur_matches_scipy_reflect_convolution():
    from scipy.ndimage import correlate

    op = make_operator("gblur", (1, 8, 8), blur_sigma=1.0, blur_size=5)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    ref = correlate(x[0, 0].numpy(), op.kernel.numpy(), mode="mirror")  # torch 'reflect' == scipy 'mirror'
    np.testing.assert_allclose(op(x)[0, 0].numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("task, shape, match", [
    ("deblur", (1, 8, 8), "--task must be one of"),
    ("inpaint-box", (2,), "needs image inputs"),
    ("sr-bicubic", (1, 8, 8, ), None),
    ("gblur", (1, 8, 8), None),
])
def test_user_errors(task, shape, match):
    if match is None:
        make_operator(task, shape)  # valid
        return
    with pytest.raises(ValueError, match=match):
        make_operator(task, shape)


def test_more_user_errors(tmp_path):
    with pytest.raises(ValueError, match="factor must be"):
        make_operator("sr-avgpool", (1, 8, 8), sr_factor=3)
    with pytest.raises(ValueError, match="too large"):
        make_operator("gblur", (1, 8, 8), blur_size=21)
    with pytest.raises(ValueError, match=r"shape \(M, 64\)"):
        MatrixOperator((1, 8, 8), np.ones((3, 10)))
    with pytest.raises(ValueError, match=".npy"):
        make_operator(f"matrix:{tmp_path / 'A.txt'}", (2,))
    with pytest.raises(ValueError, match="cannot load"):
        make_operator(f"matrix:{tmp_path / 'missing.npy'}", (2,))
    op = make_operator("inpaint-box", (1, 8, 8))
    with pytest.raises(ValueError, match="x must have shape"):
        op(torch.zeros(1, 8, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        op(np.zeros((1, 1, 8, 8)))
    with pytest.raises(ValueError, match="sigma_y"):
        op.measure(torch.zeros(1, 1, 8, 8), -1.0)
