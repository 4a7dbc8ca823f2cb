"""Global alignment: weighted least squares over the tile graph, anchored weakly to the stage.

Unknowns are tile positions (y, x) in px. Every reliable pair contributes p_b - p_a = measured offset
with its registration weight; every tile contributes p = stage position with a weak weight (σ = the
stage's error limit), so a tile or a component without reliable links lands on (the mean of) its stage
positions, and links inside a component decide its shape. Already frozen tiles enter as constants.
Outliers: while the worst kept pair's residual exceeds the threshold, that pair is dropped and the
system is solved again, so one bad link is removed instead of being spread over its neighbours.
Placement limit: a tile the links put farther than the limit from its stage position (either axis)
contradicts the stage's specification, so its placement is rejected, never clamped: its links are
dropped (`beyond_stage_error`), it lands on its stage position, and the rest is solved again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from wsi_common.tile_grid import Cell


@dataclass(frozen=True)
class AlignmentParameters:
    max_residual_px: float = 1.5        # a kept pair may disagree with the solution by at most this
    registration_sigma_px: float = 0.2  # position error of a perfect (ncc -> 1) pair, px


@dataclass(frozen=True)
class Link:
    a: Cell
    b: Cell
    offset_px: tuple[float, float]  # measured p_b - p_a, (dy, dx)
    weight: float


@dataclass
class AlignmentSolution:
    positions_px: dict[Cell, tuple[float, float]]
    residuals_px: dict[tuple[Cell, Cell], float]  # every link given, kept or not
    dropped: dict[tuple[Cell, Cell], str]          # link -> "outlier_residual" or "beyond_stage_error"
    beyond_limit: set[Cell]                        # tiles whose placement was rejected


def _solve(unknown: list[Cell], stage_px, fixed_px, links: list[Link], parameters: AlignmentParameters,
           stage_sigma_px: float):
    index = {cell: i for i, cell in enumerate(unknown)}
    n = len(unknown)
    prior_weight = 1.0 / stage_sigma_px ** 2
    link_scale = 1.0 / parameters.registration_sigma_px ** 2
    rows, cols, vals = [], [], []
    rhs = np.zeros((n, 2))
    diagonal = np.full(n, prior_weight)
    for i, cell in enumerate(unknown):
        rhs[i] += prior_weight * np.asarray(stage_px[cell])
    for link in links:
        w = link.weight * link_scale
        offset = np.asarray(link.offset_px)
        ia, ib = index.get(link.a), index.get(link.b)
        if ia is not None and ib is not None:
            diagonal[ia] += w
            diagonal[ib] += w
            rows += [ia, ib]
            cols += [ib, ia]
            vals += [-w, -w]
            rhs[ia] -= w * offset
            rhs[ib] += w * offset
        elif ia is not None:
            diagonal[ia] += w
            rhs[ia] += w * (np.asarray(fixed_px[link.b]) - offset)
        elif ib is not None:
            diagonal[ib] += w
            rhs[ib] += w * (np.asarray(fixed_px[link.a]) + offset)
    rows += list(range(n))
    cols += list(range(n))
    vals += list(diagonal)
    normal = scipy.sparse.csc_matrix((vals, (rows, cols)), shape=(n, n))
    solve = scipy.sparse.linalg.factorized(normal)
    solution = np.column_stack([solve(rhs[:, 0]), solve(rhs[:, 1])])
    return {cell: (float(solution[i, 0]), float(solution[i, 1])) for i, cell in enumerate(unknown)}


def solve_positions(stage_px: dict[Cell, tuple[float, float]], links: list[Link],
                    fixed_px: dict[Cell, tuple[float, float]] | None = None,
                    parameters: AlignmentParameters = AlignmentParameters(), *, stage_sigma_px: float,
                    placement_limit_px: float = math.inf) -> AlignmentSolution:
    """Positions of the tiles in stage_px that are not in fixed_px, given reliable links between
    any of them. Links between two fixed tiles carry no information and are ignored. No unknown tile
    ends farther than placement_limit_px (per axis) from its stage position: one that would is
    rejected (see the module docstring)."""
    fixed_px = fixed_px or {}
    unknown = sorted(cell for cell in stage_px if cell not in fixed_px)
    usable = [link for link in links if not (link.a in fixed_px and link.b in fixed_px)
              and (link.a in stage_px or link.a in fixed_px) and (link.b in stage_px or link.b in fixed_px)]
    kept = list(usable)
    dropped: dict[tuple[Cell, Cell], str] = {}
    beyond_limit: set[Cell] = set()
    while True:
        solved = _solve(unknown, stage_px, fixed_px, kept, parameters, stage_sigma_px) if unknown else {}
        everywhere = {**fixed_px, **solved}
        residuals = {}
        for link in usable:
            pa, pb = np.asarray(everywhere[link.a]), np.asarray(everywhere[link.b])
            residuals[(link.a, link.b)] = float(np.linalg.norm(pb - pa - np.asarray(link.offset_px)))
        if kept:
            worst = max(kept, key=lambda link: residuals[(link.a, link.b)])
            if residuals[(worst.a, worst.b)] > parameters.max_residual_px:
                kept.remove(worst)
                dropped[(worst.a, worst.b)] = "outlier_residual"
                continue
        excess = {cell: float(np.max(np.abs(np.subtract(solved[cell], stage_px[cell])))) - placement_limit_px
                  for cell in unknown}
        farthest = max(excess, key=excess.get, default=None)
        if farthest is None or excess[farthest] <= 0:
            break
        # The farthest tile first: rejecting it may bring the others back within the limit.
        beyond_limit.add(farthest)
        for link in [link for link in kept if farthest in (link.a, link.b)]:
            kept.remove(link)
            dropped[(link.a, link.b)] = "beyond_stage_error"
    return AlignmentSolution(solved, residuals, dropped, beyond_limit)
