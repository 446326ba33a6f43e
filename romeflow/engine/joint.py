"""Eq. 2 over a whole stack: one update re-solved from every edit's (k*, v*) pairs (stack.method: joint;
docs/method.md, "The joint stack solve"), optionally restricted to the null space of the key statistics."""

from __future__ import annotations

import torch

from .rome import InsertError, Solver, insert_many


JOINT_MIN_RESIDUAL = 1e-4  # the exact joint solve refuses edited keys with less of their C⁻¹-energy of their own


def null_space_basis(second_moment: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """Q (d_in, q): the eigenvectors of C whose eigenvalue is below threshold · λ_max, float64.

    The others, Û (eigenvalue ≥ threshold · λ_max), are the directions along which the layer's keys
    carry most of their energy: an update restricted to P = I − Û Ûᵀ = Q Qᵀ leaves every key's
    component along them unchanged (AlphaEdit's projection, from the same statistics).
    threshold 0: no projection (None)."""
    if threshold <= 0:
        return None
    evals, evecs = torch.linalg.eigh(second_moment.double())  # ascending; (d_in,), (d_in, d_in)
    return evecs[:, evals < threshold * evals[-1]].contiguous()  # (d_in, q)


def projected_solver(second_moment: torch.Tensor, basis: torch.Tensor) -> Solver:
    """C⁻¹ in the coordinates of Q: a Solver for C_Q = Qᵀ C Q (q, q)."""
    return Solver(basis.T @ second_moment.double() @ basis)


def _check_separable(solve: Solver, keys: torch.Tensor, min_residual: float) -> None:
    """InsertError(index=i) for the first key (rows of ``keys``, (n, d_in)) with less than ``min_residual``
    of its C⁻¹-energy outside the span of the keys before it: L_ii² / M_ii, M = K C⁻¹ Kᵀ = L Lᵀ."""
    m = keys.to(solve.device, torch.float64) @ solve.solve64(keys.T)  # (n, n)
    factor, info = torch.linalg.cholesky_ex(m)
    bad = int(info)  # 0: factorised; i > 0: the leading minor of order i is not positive definite
    share = factor.diagonal() ** 2 / m.diagonal()  # (n,)
    if bad == 0 and bool((share >= min_residual).all()):
        return
    worst = bad - 1 if bad else int((share < min_residual).nonzero()[0])
    raise InsertError(f"key {worst} has less than {100 * min_residual:g}% of its C⁻¹-energy outside the span of "
                      f"the keys before it (the same subject edited twice, or keys too close to tell apart)", worst)


def joint_insert(solve: Solver, w: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 protected: torch.Tensor | None = None, ridge: float = 0.0, basis: torch.Tensor | None = None,
                 min_residual: float = JOINT_MIN_RESIDUAL,
                 scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 for every edit of a stack at once, from their (k_i, v_i) pairs and the base weight W:

        minimise ‖Δ‖_C   subject to   (W + Δ) k_i = v_i  (i = 1..n)   and   Δ k'_j = 0  (j = 1..m)

    i.e. ``insert_many`` with e = n edited keys, residuals r_i = v_i − W k_i and the edits' protected
    keys k'_j: Δ = R M⁻¹ (C⁻¹K)ᵀ, M = Kᵀ C⁻¹ K, rank ≤ n.

    basis Q (d_in, q) (``null_space_basis``): the update is also restricted to P = Q Qᵀ = I − Û Ûᵀ,
    Δ = Y Qᵀ, so Δ Û = 0. Then ‖Δ‖_C² = tr(Y Qᵀ C Q Yᵀ) and Δ k = Y (Qᵀ k): the same problem in q
    coordinates, with C_Q = Qᵀ C Q (``solve`` must be ``projected_solver``'s) and keys Qᵀ k; V = Q V_Q.

    ridge > 0: the least-squares relaxation, for conflicting or near-collinear keys:

        minimise Σ_i ‖Δ k_i − r_i‖² + λ ‖Δ‖_C²   →   Δ = R (M + λ I)⁻¹ (C⁻¹K)ᵀ,   λ = ridge · mean diag M

    (insert_many's ridge). With ridge 0 the constraints hold exactly; a protected key already in the
    span of the keys before it (the same subject protected by two edits) is dropped, and an edited key with less
    than ``min_residual`` of its C⁻¹-energy outside the span of the keys before it is refused
    (InsertError, with its index: the later of two keys that cannot be told apart). The shares are
    the squared pivots of the Cholesky factor of M over its diagonal, L_ii² / M_ii.

    scales (n,): edit i asks for W k_i + s_i (v_i − W k_i) instead of v_i (the stack's calibration,
    ``compose.EditedModel``); None: every s_i = 1.

    w: (d_out, d_in); keys: (n, d_in); values: (n, d_out); protected: (m, d_in) or None.
    Returns the factors U (d_out, n), V (d_in, n) of Δ = U Vᵀ, float32.
    """
    at = lambda t: t.to(solve.device, torch.float64)  # noqa: E731 - the solve's device, float64
    residuals = at(values) - at(keys) @ at(w).T  # (n, d_out) r_i = v_i − W k_i
    if scales is not None:
        residuals = residuals * at(scales)[:, None]  # (n, d_out) s_i r_i
    k, p = at(keys), None if protected is None or not protected.numel() else at(protected)
    if basis is not None:
        k, p = k @ basis, None if p is None else p @ basis  # (n, q), (m, q): coordinates along Q
    while ridge <= 0:  # protected keys that repeat others (two edits protecting one subject) are dropped
        try:
            _check_separable(solve, k if p is None else torch.cat([k, p]), min_residual)
            break
        except InsertError as e:
            if e.index is None or e.index < k.shape[0]:
                raise
            p = torch.cat([p[:e.index - k.shape[0]], p[e.index - k.shape[0] + 1:]])
            p = p if p.numel() else None
    u, v = insert_many(solve, k, residuals, None, p, ridge, 0.0)
    if basis is not None:
        v = basis @ v  # (d_in, n)
    return u.float(), v.float()
