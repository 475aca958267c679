"""Initial maps ``C₀`` from what the user points at, and from given label maps (METHOD §5).

Regions (coordinates in image pixels, ``x`` right, ``y`` down; ``image_size = (H, W)``) become
one-hot or area-averaged maps on the self-attention grid ``(g_h, g_w)``, exactly as the authors'
demo builds them:

* the grid cell of a pixel position ``(x, y)`` is ``(⌊y·g_h / H⌋, ⌊x·g_w / W⌋)`` (the demo's
  ``(y·64 // H, x·64 // W)``; computed exactly, also for float coordinates);
* :class:`Point` ``(x, y)``: one column, 1 on that cell. ``Point([(x, y), ...])`` (several
  points, one region): one one-hot column per distinct cell, averaged after refinement;
* :class:`Box` ``(x0, y0, x1, y1)``: one column, 1 on the cells ``r0 ≤ r < r1, c0 ≤ c < c1``
  with ``r0 = ⌊y0·g_h/H⌋, r1 = ⌊y1·g_h/H⌋, c0 = ⌊x0·g_w/W⌋, c1 = ⌊x1·g_w/W⌋`` (the demo's
  ``cross[y1:y2, x1:x2] = 1``, end exclusive). Where the demo's range is empty (the box crosses
  no cell boundary on that axis: ``r1 == r0``) the box keeps its one row (column) of cells:
  ``r1 = r0 + 1`` (the demo would divide an all-zero map by zero there);
* :class:`Line` ``([(x, y), (x, y), ...])``: a polyline, consecutive vertices joined by
  straight segments; its cells are every cell that a point of the polyline lies in (the cell
  rule above applied to every point of every segment, computed exactly at the segments' grid
  crossings), deduplicated; one one-hot column per cell, averaged after refinement (the demo
  does the same with the cells its mouse passed over);
* :class:`Mask` ``(bool [H, W])``: one column, each cell's value the fraction of its area that
  the mask covers (exact area averaging: cell ``r`` spans pixel rows ``[r·H/g_h, (r+1)·H/g_h)``,
  partial pixels weighted by their overlap).
* ``Point(x, y, negative=True)`` (a background click): its columns are built and refined like
  a point's, but the region is subtracted from the others (:func:`combine_region_maps`): every
  other region's map becomes ``max(0, map − background)``, where ``background`` is the largest
  of the negative regions' maps; a negative region's own map is all zeros (it never wins a
  pixel). A region list needs at least one region that is not negative.

Columns of one region are in raster order of their cells (as the demo's ``torch.nonzero``).
After refinement, :func:`combine_region_maps` turns the columns into one map per region.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "Point",
    "Box",
    "Line",
    "Mask",
    "validate_regions",
    "region_maps",
    "combine_region_maps",
    "RegionGroup",
    "label_map_seeds",
]

IGNORE = 255  # label-map pixels excluded from the averaging and kept as they are


# ----------------------------------------------------------------------------------------------
# Regions


def _as_pairs(value: Any) -> Any:
    """``[(x, y), ...]`` as a tuple of tuples where it iterates that way (validation reports
    anything else); ``value`` unchanged otherwise."""
    sequences = (Sequence, np.ndarray, torch.Tensor)
    if isinstance(value, (str, bytes)) or not isinstance(value, sequences):
        return value
    out = []
    for item in value:
        if isinstance(item, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(item, str):
            out.append(tuple(item))
        else:
            out.append(item)
    return tuple(out)


@dataclass(frozen=True, init=False)
class Point:
    """A click at pixel ``(x, y)``, or several clicks ``Point([(x, y), ...])`` that form one
    region (one initial map per distinct grid cell, averaged after refinement).

    ``negative=True`` makes it a background click, subtracted from the other regions (module
    docstring).

    Example:
        >>> Point(120, 80).points
        ((120, 80),)
        >>> Point(5, 6, negative=True).negative
        True
    """

    points: tuple
    negative: bool = False

    def __init__(self, x: Any, y: Any = None, negative: bool = False) -> None:
        if y is None and not _is_number(x):
            object.__setattr__(self, "points", _as_pairs(x))
        else:
            object.__setattr__(self, "points", ((x, y),))
        object.__setattr__(self, "negative", negative)


@dataclass(frozen=True)
class Box:
    """A box with corners ``(x0, y0)`` (top left) and ``(x1, y1)`` (bottom right) in pixels,
    ``0 ≤ x0 < x1 ≤ W``, ``0 ≤ y0 < y1 ≤ H``; its cells are listed in the module docstring."""

    x0: float
    y0: float
    x1: float
    y1: float


@dataclass(frozen=True)
class Line:
    """A polyline through ``points = [(x, y), (x, y), ...]`` (at least 2 vertices), e.g. a
    scribble: one initial map per grid cell it crosses, averaged after refinement."""

    points: tuple

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", _as_pairs(self.points))


@dataclass(frozen=True, eq=False)
class Mask:
    """A given binary mask ``[H, W]`` at the image's size (bool NumPy array or tensor, or 0/1
    integers), area-averaged to the grid."""

    mask: Any


REGION_TYPES = (Point, Box, Line, Mask)


# ----------------------------------------------------------------------------------------------
# Validation


def _is_number(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.dtype.is_complex and v.dtype != torch.bool
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _number(v: Any, where: str) -> float | int:
    """``v`` as a finite Python int or float; ``TypeError``/``ValueError`` naming ``where``."""
    if not _is_number(v):
        raise TypeError(f"{where} must be a number, got {type(v).__name__}")
    v = v.item() if isinstance(v, (torch.Tensor, np.generic)) else v
    if isinstance(v, numbers.Integral):
        return int(v)
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{where} is {v} (coordinates must be finite numbers)")
    return v


def _check_size(image_size: Any, name: str = "image_size") -> tuple[int, int]:
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in image_size)
    ):
        raise TypeError(f"{name} must be a pair of ints (H, W), got {image_size!r}")
    h, w = (int(s) for s in image_size)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive (H, W), got {image_size!r}")
    return h, w


def _check_grid(grid: Any) -> tuple[int, int]:
    if isinstance(grid, numbers.Integral) and not isinstance(grid, bool):
        grid = (int(grid), int(grid))
    return _check_size(grid, "grid")


def _pixel(pair: Any, where: str, size: tuple[int, int]) -> tuple[float | int, float | int]:
    """A vertex/click ``(x, y)`` inside the image: ``0 ≤ x < W``, ``0 ≤ y < H``."""
    if not isinstance(pair, tuple) or len(pair) != 2:
        if isinstance(pair, tuple):
            raise ValueError(f"{where} must be an (x, y) pair, got {len(pair)} values")
        raise TypeError(f"{where} must be an (x, y) pair, got {type(pair).__name__}")
    x, y = _number(pair[0], f"{where} x"), _number(pair[1], f"{where} y")
    h, w = size
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(
            f"{where} ({x}, {y}) is outside the image "
            f"(0 ≤ x < {w}, 0 ≤ y < {h}; W×H = {w}×{h})"
        )
    return x, y


def _pairs(points: Any, where: str, what: str) -> tuple:
    if not isinstance(points, tuple):
        raise TypeError(f"{where} needs a list of (x, y) {what}, got {type(points).__name__}")
    return points


def _mask_array(mask: Any, where: str, size: tuple[int, int]) -> np.ndarray:
    """A Mask's array as bool ``[H, W]`` NumPy."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{where} must be a bool [H, W] array or tensor, got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        if not np.issubdtype(mask.dtype, np.integer):
            raise TypeError(
                f"{where} must be a bool [H, W] array or tensor, got dtype {mask.dtype}"
            )
        if mask.size and not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{where} holds integers other than 0 and 1 (give a bool mask)")
    if mask.shape != size:
        shape = "×".join(map(str, mask.shape))
        raise ValueError(
            f"{where} is {shape} but the image is {size[0]}×{size[1]} (masks are [H, W] at the "
            f"image's size)"
        )
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError(f"{where} selects no pixel")
    return mask


def _normalise(regions: Any, image_size: Any) -> tuple[tuple[int, int], list[tuple[str, Any]]]:
    """Validated ``(size, [(kind, data), ...])``: kind ``"cells"`` with data ``[(x, y), ...]`` (or
    ``"line"``, ``"box"`` and ``"mask"`` with their coordinates / bool array)."""
    size = _check_size(image_size)
    if not isinstance(regions, (list, tuple)):
        raise TypeError(
            f"regions must be a list of Point/Box/Line/Mask, got {type(regions).__name__}"
        )
    if len(regions) == 0:
        raise ValueError("regions is empty: give at least one Point, Box, Line or Mask")
    out: list[tuple[str, Any]] = []
    for i, region in enumerate(regions):
        name = type(region).__name__
        where = f"regions[{i}] ({name})"
        if isinstance(region, Point):
            pts = _pairs(region.points, where, "points")
            if not pts:
                raise ValueError(f"{where} has no points")
            if not isinstance(region.negative, (bool, np.bool_)):
                raise TypeError(f"{where} negative must be True or False, got {region.negative!r}")
            pixels = [_pixel(p, f"{where} point {j}", size) for j, p in enumerate(pts)]
            out.append(("negative" if region.negative else "points", pixels))
        elif isinstance(region, Box):
            x0, y0, x1, y1 = (
                _number(getattr(region, c), f"{where} {c}") for c in ("x0", "y0", "x1", "y1")
            )
            h, w = size
            if not x1 > x0:
                raise ValueError(f"{where}: x1 ({x1}) must be > x0 ({x0})")
            if not y1 > y0:
                raise ValueError(f"{where}: y1 ({y1}) must be > y0 ({y0})")
            if not (0 <= x0 and x1 <= w and 0 <= y0 and y1 <= h):
                raise ValueError(
                    f"{where} ({x0}, {y0}, {x1}, {y1}) is outside the image "
                    f"(0 ≤ x0 < x1 ≤ {w}, 0 ≤ y0 < y1 ≤ {h}; W×H = {w}×{h})"
                )
            out.append(("box", (x0, y0, x1, y1)))
        elif isinstance(region, Line):
            pts = _pairs(region.points, where, "vertices")
            if len(pts) < 2:
                raise ValueError(f"{where} needs at least 2 vertices, got {len(pts)}")
            pixels = [_pixel(p, f"{where} vertex {j}", size) for j, p in enumerate(pts)]
            out.append(("line", pixels))
        elif isinstance(region, Mask):
            out.append(("mask", _mask_array(region.mask, f"{where} mask", size)))
        else:
            raise TypeError(f"regions[{i}] must be a Point, Box, Line or Mask, got {name}")
    if all(kind == "negative" for kind, _ in out):
        raise ValueError(
            "regions has only negative points: add a region to segment (a Point, Box, Line or Mask)"
        )
    return size, out


def validate_regions(
    regions: Sequence[Point | Box | Line | Mask], image_size: tuple[int, int]
) -> None:
    """Check a region list before any model runs.

    Args:
        regions: a non-empty list of :class:`Point`, :class:`Box`, :class:`Line`, :class:`Mask`.
        image_size: ``(H, W)`` of the image the coordinates refer to.

    Raises:
        TypeError: ``regions`` is not a list, a region is not one of the four types, or a
            coordinate / mask has the wrong type.
        ValueError: empty list, NaN or infinite coordinates, a point or vertex outside the image
            (``0 ≤ x < W``, ``0 ≤ y < H``), only negative points, a box with ``x1 ≤ x0`` or ``y1 ≤ y0`` or outside
            ``[0, W] × [0, H]``, a line with fewer than 2 vertices, a mask of another size or
            selecting no pixel. The message names the region index.

    Example:
        >>> validate_regions([Point(5, 5), Box(0, 0, 10, 8)], (8, 10))
    """
    _normalise(regions, image_size)


# ----------------------------------------------------------------------------------------------
# Cells


def _cell(x: float | int, y: float | int, size: tuple[int, int], grid: tuple[int, int]):
    """Grid cell ``(⌊y·g_h/H⌋, ⌊x·g_w/W⌋)`` of a pixel position, computed exactly."""
    (h, w), (gh, gw) = size, grid
    return math.floor(Fraction(y) * gh / h), math.floor(Fraction(x) * gw / w)


def _box_cells(box, size, grid) -> tuple[range, range]:
    """Rows and columns of a box's cells (module docstring): the demo's end-exclusive
    ``[⌊y0·g/H⌋, ⌊y1·g/H⌋)``, at least one cell per axis."""
    x0, y0, x1, y1 = box
    r0, c0 = _cell(x0, y0, size, grid)
    r1, c1 = _cell(x1, y1, size, grid)
    return range(r0, max(r1, r0 + 1)), range(c0, max(c1, c0 + 1))


def _segment_cells(a, b, size, grid) -> set[tuple[int, int]]:
    """Every cell containing a point of the segment ``a → b`` (pixel coordinates): the cells at
    the parameters where the segment crosses a grid line, and between consecutive crossings."""
    (h, w), (gh, gw) = size, grid
    ua, va = Fraction(a[0]) * gw / w, Fraction(a[1]) * gh / h
    ub, vb = Fraction(b[0]) * gw / w, Fraction(b[1]) * gh / h
    ts = {Fraction(0), Fraction(1)}
    for start, end in ((ua, ub), (va, vb)):
        if start != end:
            lo, hi = sorted((start, end))
            for k in range(math.ceil(lo), math.floor(hi) + 1):
                ts.add((k - start) / (end - start))
    ts = sorted(ts)
    samples = ts + [(t0 + t1) / 2 for t0, t1 in zip(ts, ts[1:])]
    return {
        (math.floor(va + t * (vb - va)), math.floor(ua + t * (ub - ua))) for t in samples
    }


def line_cells(
    points: Sequence[tuple[float, float]], image_size: tuple[int, int], grid: tuple[int, int]
) -> list[tuple[int, int]]:
    """The grid cells ``(row, col)`` of a polyline through ``points`` (pixel ``(x, y)``), in
    raster order, deduplicated (see the module docstring for the rule).

    Example:
        >>> line_cells([(0, 0), (7, 0)], (8, 8), (4, 4))
        [(0, 0), (0, 1), (0, 2), (0, 3)]
    """
    size, grid = _check_size(image_size), _check_grid(grid)
    cells: set[tuple[int, int]] = set()
    for a, b in zip(points, points[1:]):
        cells |= _segment_cells(a, b, size, grid)
    return sorted(cells)


def _area_weights(n_pixels: int, n_cells: int) -> torch.Tensor:
    """``[n_cells, n_pixels]`` float64: the fraction of cell ``i`` (pixels ``[i·n/g, (i+1)·n/g)``)
    that pixel ``p`` (``[p, p+1)``) covers; each row sums to 1."""
    edges = torch.arange(n_cells + 1, dtype=torch.float64) * (n_pixels / n_cells)
    p = torch.arange(n_pixels, dtype=torch.float64)
    overlap = torch.minimum(edges[1:, None], p[None, :] + 1) - torch.maximum(
        edges[:-1, None], p[None, :]
    )
    return overlap.clamp_min(0.0) * (n_cells / n_pixels)


def area_average(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area averages of ``[..., H, W]`` maps over the cells of ``grid`` → ``[..., g_h, g_w]``
    float64 (exact: partial pixels weighted by their overlap with the cell).

    Example:
        >>> area_average(torch.ones(1, 6, 6), (4, 4)).shape
        torch.Size([1, 4, 4])
    """
    gh, gw = _check_grid(grid)
    h, w = maps.shape[-2:]
    a_h, a_w = _area_weights(h, gh), _area_weights(w, gw)
    return a_h @ maps.to(torch.float64) @ a_w.T


def region_maps(
    regions: Sequence[Point | Box | Line | Mask],
    image_size: tuple[int, int],
    grid: tuple[int, int],
) -> tuple[torch.Tensor, list[list[int]]]:
    """Initial maps of a region list (validated first, see :func:`validate_regions`).

    Args:
        regions: ``R`` regions (:class:`Point`, :class:`Box`, :class:`Line`, :class:`Mask`).
        image_size: ``(H, W)`` of the image the coordinates refer to.
        grid: ``(g_h, g_w)`` of the self-attention (an int for a square grid).

    Returns:
        ``(C0, groups)``: ``C0`` ``[g_h·g_w, M]`` float32 on the CPU (raster order of the grid),
        one column per Point (single click), Box or Mask and one per distinct cell of a Line or a
        multi-click Point; ``groups[r]`` lists the columns of region ``r`` (a
        :class:`RegionGroup`, whose ``negative`` says whether region ``r`` is a negative point).

    Example:
        >>> c0, groups = region_maps([Point(0, 0), Line([(0, 3), (7, 3)])], (8, 8), (4, 4))
        >>> c0.shape, groups
        (torch.Size([16, 5]), [[0], [1, 2, 3, 4]])
    """
    size, items = _normalise(regions, image_size)
    grid = _check_grid(grid)
    gh, gw = grid
    columns: list[torch.Tensor] = []
    groups: list[RegionGroup] = []
    for kind, data in items:
        if kind in ("points", "negative", "line"):
            if kind != "line":
                cells = sorted({_cell(x, y, size, grid) for x, y in data})
            else:
                cells = line_cells(data, size, grid)
            group = []
            for r, c in cells:
                col = torch.zeros(gh * gw, dtype=torch.float32)
                col[r * gw + c] = 1.0
                group.append(len(columns))
                columns.append(col)
        elif kind == "box":
            rows, cols = _box_cells(data, size, grid)
            col = torch.zeros(gh, gw, dtype=torch.float32)
            col[rows.start : rows.stop, cols.start : cols.stop] = 1.0
            group = [len(columns)]
            columns.append(col.flatten())
        else:  # mask
            col = area_average(torch.from_numpy(data), grid).to(torch.float32)
            group = [len(columns)]
            columns.append(col.flatten())
        groups.append(RegionGroup(group, negative=kind == "negative"))
    return torch.stack(columns, dim=1), groups


class RegionGroup(list):
    """The column indices of one region (a list), and whether the region is a negative point."""

    def __init__(self, columns=(), negative: bool = False) -> None:
        super().__init__(columns)
        self.negative = negative


def combine_region_maps(refined: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """One map per region from the refined columns (the authors' demo, METHOD §5): each column
    divided by its maximum, the columns of a region averaged, the result divided by its maximum.
    Where some groups are negative (:class:`RegionGroup`), each other region's map is then
    ``max(0, map − background)`` (``background``: the largest negative map, per cell) and each
    negative region's map is zeros.

    Args:
        refined: ``[..., HW, M]`` refined maps (e.g. :func:`iseg_ops.refine` of the columns of
            :func:`region_maps`).
        groups: ``R`` non-empty lists of column indices (``groups`` of :func:`region_maps`).

    Returns:
        Tensor: ``[..., HW, R]`` in ``refined``'s dtype, each region's map with maximum 1; a
        column (or region) whose maximum is ≤ 0 gives zeros, never NaN.

    Example:
        >>> combine_region_maps(torch.tensor([[1.0, 0.5], [0.0, 1.0]]), [[0, 1]])
        tensor([[1.0000],
                [0.6667]])
    """
    if not isinstance(refined, torch.Tensor) or not refined.is_floating_point():
        what = refined.dtype if isinstance(refined, torch.Tensor) else type(refined).__name__
        raise TypeError(f"refined must be a floating-point tensor [..., HW, M], got {what}")
    if refined.dim() < 2:
        raise ValueError(f"refined must be [..., HW, M], got shape {tuple(refined.shape)}")
    m = refined.shape[-1]
    if not isinstance(groups, (list, tuple)) or not groups:
        raise ValueError("groups must be a non-empty list of column-index lists")
    for r, group in enumerate(groups):
        if not isinstance(group, (list, tuple)) or not group:
            raise ValueError(
                f"groups[{r}] must be a non-empty list of column indices, got {group!r}"
            )
        for j in group:
            if isinstance(j, bool) or not isinstance(j, numbers.Integral) or not 0 <= j < m:
                raise ValueError(f"groups[{r}] has column {j!r}, not an index into {m} columns")
    maps = _divide_by_max(refined)
    out = _divide_by_max(torch.stack([maps[..., list(g)].mean(dim=-1) for g in groups], dim=-1))
    negative = torch.tensor([bool(getattr(g, "negative", False)) for g in groups], device=out.device)
    if not negative.any():
        return out
    background = out[..., negative].amax(dim=-1, keepdim=True)
    return torch.where(negative, 0.0, (out - background).clamp_min(0.0)).to(out.dtype)


def _divide_by_max(c: torch.Tensor) -> torch.Tensor:
    """Per column of ``[..., HW, K]``: divided by its maximum; a maximum ≤ 0 gives zeros."""
    top = c.amax(dim=-2, keepdim=True)
    return torch.where(top > 0, c / torch.where(top > 0, top, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------
# Given label maps


def label_map_seeds(label_map: Any, grid: tuple[int, int]) -> tuple[torch.Tensor, list[int]]:
    """Initial maps from given masks (the paper's Fig. 6: refine another generator's masks).

    Args:
        label_map: ``[H, W]`` integer ids (0 = background, 255 = ignore, ``1..254`` = classes)
            or ``[K, H, W]`` soft maps (real values, e.g. probabilities); tensor or NumPy array.
        grid: ``(g_h, g_w)`` of the self-attention (an int for a square grid).

    Returns:
        ``(C0, ids)``: ``C0`` ``[g_h·g_w, K]`` float32 on the CPU and the ``K`` ids it maps.
        Ids: one column per class id present (ascending; 0 and 255 excluded), each cell the
        fraction of the cell's non-ignored area that the class covers (exact area averaging;
        255 pixels count in neither numerator nor denominator; a cell entirely 255 gives 0).
        Soft maps: map ``k`` area-averaged, ids ``[1..K]``. ``K = 0`` (only background and
        ignore) gives a ``[HW, 0]`` tensor and ``ids = []``.

    Raises:
        TypeError: not a tensor/array, ``[H, W]`` not integers, non-real soft maps.
        ValueError: another number of dims, an empty map, a negative id, an id ≥ 255 other than
            255, NaN/Inf in soft maps, ``K = 0`` soft maps.

    Example:
        >>> c0, ids = label_map_seeds(torch.tensor([[0, 3], [255, 3]]), (1, 1))
        >>> c0, ids
        (tensor([[0.6667]]), [3])
    """
    grid = _check_grid(grid)
    if isinstance(label_map, np.ndarray):
        label_map = torch.from_numpy(np.ascontiguousarray(label_map))
    if not isinstance(label_map, torch.Tensor):
        raise TypeError(
            f"label_map must be a tensor or NumPy array ([H, W] ids or [K, H, W] soft maps), "
            f"got {type(label_map).__name__}"
        )
    label_map = label_map.detach().cpu()
    shape = "×".join(map(str, label_map.shape)) or "scalar"
    if label_map.dim() not in (2, 3) or label_map.numel() == 0:
        raise ValueError(
            f"label_map must be [H, W] ids or [K, H, W] soft maps (non-empty), got {shape}"
        )
    if label_map.dim() == 3:
        if label_map.dtype == torch.bool or label_map.is_complex():
            raise TypeError(
                f"label_map [K, H, W] soft maps must be real numbers, got {label_map.dtype}"
            )
        if not torch.isfinite(label_map.to(torch.float64)).all():
            raise ValueError("label_map soft maps contain NaN or Inf")
        averaged = area_average(label_map, grid)  # [K, g_h, g_w]
        k = label_map.shape[0]
        return averaged.flatten(1).T.to(torch.float32).contiguous(), list(range(1, k + 1))
    if label_map.is_floating_point() or label_map.is_complex() or label_map.dtype == torch.bool:
        raise TypeError(f"label_map [H, W] must hold integer class ids, got {label_map.dtype}")
    labels = label_map.to(torch.int64)
    present = torch.unique(labels).tolist()
    if present[0] < 0:
        raise ValueError(f"label_map has a negative class id ({present[0]})")
    bad = [v for v in present if v >= IGNORE and v != IGNORE]
    if bad:
        raise ValueError(
            f"label_map has class id {bad[0]} ≥ 255 (ids are 1..254; 0 = background, "
            f"255 = ignore)"
        )
    ids = [v for v in present if v not in (0, IGNORE)]
    gh, gw = grid
    valid = area_average((labels != IGNORE).to(torch.float64), grid)  # [g_h, g_w]
    columns = []
    for v in ids:
        area = area_average((labels == v).to(torch.float64), grid)
        columns.append(torch.where(valid > 0, area / torch.where(valid > 0, valid, 1.0), 0.0))
    if not columns:
        return torch.zeros(gh * gw, 0), []
    return torch.stack(columns, dim=-1).reshape(gh * gw, len(ids)).to(torch.float32), ids
