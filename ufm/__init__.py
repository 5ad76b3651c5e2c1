"""The mixup unconstrained-features optimum (Fisher, Meng & Papyan 2024, section 3) and its fit to
learned features. Pure functions on tensors, float64 throughout; nothing here writes files.

    h*(t) = argmin_h  l(W h + b, t) + (gamma / 2) |h|^2,    fitted as  min_{s, gamma} |P H - s H*(gamma)|_F

The package, one room per subject (each file's docstring has its details):

    problem.py    the reduced problem: inputs checked, unique targets, the row space of W, SolverError
    optimum.py    h*(T) for a classifier, a loss and gamma: mse's closed form, and which solver for which loss
    newton.py     Newton for cross_entropy, focal and smooth_l1: starts, factorisations, the line search
    objective.py  their per-row losses, gradient and Newton matrix (the logit Hessian written out)
    mae.py        mae's exact optimum: primal-dual and primal active-set steps, certified
    search.py     the fit's search over log gamma: the grid, the refinement, identifiability
    fitting.py    `fit` and its metrics: the one convention (H not centred), residual, floor and shape

Public names: optimal_features, newton_features, theory_curve (optimum.py), fit, unfitted_metrics,
UFMFit, GAMMA_RANGE (fitting.py), SolverError (problem.py). The rest is private to the package;
the tests reach it in its room (e.g. ufm.newton.REUSE_MIN_CLASSES).

Speed: `python bench/ufm_speed.py --threads 1` times one fit on synthetic problems with a planted
optimum; docs/ufm.md ("Cost") quotes its figures. The cost is per torch call for small problems
(hence one batch for the grid, few levels after it, single-threaded: see `problem._with_autograd`)
and per Newton factorisation (m C^3 / 3) for large ones.
"""
from ufm import fitting, mae, newton, objective, optimum, problem, search  # the rooms: ufm.<room>.<name>
from ufm.fitting import GAMMA_RANGE, UFMFit, fit, unfitted_metrics
from ufm.optimum import newton_features, optimal_features, theory_curve
from ufm.problem import SolverError

__all__ = ["optimal_features", "newton_features", "theory_curve", "fit", "unfitted_metrics", "SolverError",
           "UFMFit", "GAMMA_RANGE"]
