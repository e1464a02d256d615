"""Exactness of the OBS column-removal math against brute-force least squares (float64, tiny dimensions)."""

import pytest
import torch

from prunekit.methods.obs import (
    decouple,
    downdate_inverse,
    eliminate_columns,
    inverse,
    prepare_hessian,
    unit_errors,
)


def _problem(out=5, width=3, units=4, tokens=200, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(width * units, tokens, generator=generator, dtype=torch.float64)
    inputs[1] += 0.8 * inputs[4]  # correlated inputs, so compensation has something to do
    weight = torch.randn(out, width * units, generator=generator, dtype=torch.float64)
    return weight, inputs


def _least_squares_removal(weight, inputs, removed):
    """Remove columns, refit the others by solving the normal equations directly: (refit weight, error)."""
    keep = [c for c in range(weight.shape[1]) if c not in removed]
    target = weight @ inputs
    kept_inputs = inputs[keep]
    refit = torch.linalg.solve(kept_inputs @ kept_inputs.T, kept_inputs @ target.T).T
    return refit, keep, float(((target - refit @ kept_inputs) ** 2).sum())


@pytest.mark.parametrize("unit", range(4))
def test_exact_grouped_cholesky_error_equals_brute_force(unit):
    weight, inputs = _problem()
    errors = unit_errors(weight, inverse(inputs @ inputs.T), unit_width=3, exact=True)
    _, _, brute = _least_squares_removal(weight, inputs, [3 * unit, 3 * unit + 1, 3 * unit + 2])
    assert float(errors[unit]) == pytest.approx(brute, rel=1e-9)


def _paper_ranking_directly(weight, hessian_inverse, width):
    """SlimGPT 2.3 steps 2-4 written out: per unit, factor its diagonal block of H⁻¹ on its own; sum over its columns
    of the squared column norm of W over the squared diagonal of that factor."""
    errors = []
    for unit in range(weight.shape[1] // width):
        columns = list(range(unit * width, (unit + 1) * width))
        factor = torch.linalg.cholesky(hessian_inverse[columns][:, columns])
        errors.append(sum(float((weight[:, c] ** 2).sum()) / float(factor[j, j]) ** 2 for j, c in enumerate(columns)))
    return torch.tensor(errors, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(3))
def test_paper_grouped_cholesky_ranking_equals_a_direct_computation(seed):
    weight, inputs = _problem(seed=seed)
    hessian_inverse = inverse(inputs @ inputs.T)
    paper = unit_errors(weight, hessian_inverse, 3)
    assert torch.allclose(paper, _paper_ranking_directly(weight, hessian_inverse, 3), rtol=1e-12, atol=0)
    assert not torch.allclose(paper, unit_errors(weight, hessian_inverse, 3, exact=True))  # an approximation


def test_paper_ranking_with_a_diagonal_inverse_is_the_column_norm_over_the_diagonal():
    weight = torch.tensor([[1.0, 2.0, 0.0, 3.0], [0.0, 1.0, 4.0, 0.0]], dtype=torch.float64)
    diagonal = torch.tensor([0.5, 2.0, 4.0, 1.0], dtype=torch.float64)
    errors = unit_errors(weight, torch.diag(diagonal), 2)
    expected = [1 / 0.5 + 5 / 2.0, 16 / 4.0 + 9 / 1.0]
    assert errors.tolist() == pytest.approx(expected, rel=1e-14)


def test_sequential_elimination_equals_least_squares_refit():
    weight, inputs = _problem(seed=2)
    removed = [6, 7, 8]
    refit, keep, brute = _least_squares_removal(weight, inputs, removed)
    compensated = weight.clone()
    error = eliminate_columns(compensated, inverse(inputs @ inputs.T), removed, keep)
    assert error == pytest.approx(brute, rel=1e-9)
    assert torch.allclose(compensated[:, keep], refit, atol=1e-10)
    assert (compensated[:, removed] == 0).all()


def test_two_rounds_with_decoupling_equal_one_joint_removal():
    weight, inputs = _problem(seed=3)
    hessian = inputs @ inputs.T
    stepwise = weight.clone()
    live = list(range(12))
    for unit in ([0, 1, 2], [9, 10, 11]):
        live = [c for c in live if c not in unit]
        eliminate_columns(stepwise, inverse(hessian), unit, live)
        decouple(hessian, unit)
    refit, keep, _ = _least_squares_removal(weight, inputs, [0, 1, 2, 9, 10, 11])
    assert torch.allclose(stepwise[:, keep], refit, atol=1e-9)


def test_compensation_beats_plain_slicing():
    weight, inputs = _problem(seed=4)
    removed, keep = [3, 4, 5], [0, 1, 2, 6, 7, 8, 9, 10, 11]
    compensated = weight.clone()
    eliminate_columns(compensated, inverse(inputs @ inputs.T), removed, keep)
    sliced = weight.clone()
    sliced[:, removed] = 0
    target = weight @ inputs
    assert ((target - compensated @ inputs) ** 2).sum() < 0.9 * ((target - sliced @ inputs) ** 2).sum()


def test_prepare_hessian_handles_dead_inputs_and_retries_damping():
    weight, inputs = _problem(seed=5)
    inputs[2] = 0  # a dead input feature
    hessian = inputs @ inputs.T
    damped, hessian_inverse, report = prepare_hessian(hessian, weight, damping=0.01)
    assert report.dead_inputs == 1 and (weight[:, 2] == 0).all()
    assert torch.allclose(damped @ hessian_inverse, torch.eye(12, dtype=torch.float64), atol=1e-8)
    indefinite = -torch.eye(4, dtype=torch.float64)
    indefinite[0, 0] = 4.0
    _, recovered, report = prepare_hessian(indefinite, torch.ones(2, 4, dtype=torch.float64), damping=0.01)
    assert report.retries > 0 and report.notes and torch.isfinite(recovered).all()


def test_downdated_inverse_equals_inverse_of_decoupled_hessian():
    weight, inputs = _problem(seed=6)
    hessian = inputs @ inputs.T
    downdated = downdate_inverse(inverse(hessian), [3, 4, 5])
    decouple(hessian, [3, 4, 5])
    assert torch.allclose(downdated, inverse(hessian), atol=1e-10)
