"""iseg.seeds: initial maps of points, boxes, lines and masks on hand-built grids, the line's
cells vs hand-listed sets, area averaging vs hand computations and an independent supersampling,
the per-region combination on hand values, label maps with ignore pixels, and every bad input."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iseg.seeds import (
    Box,
    Line,
    Mask,
    Point,
    RegionGroup,
    combine_region_maps,
    label_map_seeds,
    line_cells,
    region_maps,
    validate_regions,
)

# H = 100, W = 200 on a 4×8 grid: a cell is 25 px high and 25 px wide.
SIZE, GRID = (100, 200), (4, 8)


def grid_of(column: torch.Tensor, grid=GRID) -> torch.Tensor:
    return column.reshape(grid)


def cells_of(column: torch.Tensor, grid=GRID) -> set[tuple[int, int]]:
    return {tuple(int(v) for v in rc) for rc in grid_of(column, grid).nonzero()}


# ----------------------------------------------------------------------------------------------
# Points


def test_point_is_one_hot_on_its_cell():
    c0, groups = region_maps([Point(130, 60)], SIZE, GRID)
    # row 60·4 // 100 = 2, column 130·8 // 200 = 5.
    expected = torch.zeros(GRID)
    expected[2, 5] = 1.0
    assert c0.shape == (32, 1) and c0.dtype == torch.float32 and groups == [[0]]
    assert torch.equal(grid_of(c0[:, 0]), expected)


@pytest.mark.parametrize(
    ("x", "y", "cell"),
    [
        (0, 0, (0, 0)),
        (199, 99, (3, 7)),  # the last pixel
        (24, 24, (0, 0)),  # 24·8 // 200 = 0
        (25, 25, (1, 1)),  # on the boundary: the lower-right cell
        (49.99, 74.999, (2, 1)),  # floats: ⌊1.9996⌋ = 1, ⌊2.99996⌋ = 2
        (50.0, 75.0, (3, 2)),
        (np.int64(130), torch.tensor(60), (2, 5)),  # NumPy and tensor scalars
    ],
)
def test_point_cell_rule(x, y, cell):
    c0, _ = region_maps([Point(x, y)], SIZE, GRID)
    assert cells_of(c0[:, 0]) == {cell}


def test_multi_point_is_one_column_per_distinct_cell_in_raster_order():
    # (199, 99) → (3, 7); (0, 0) and (10, 10) share (0, 0); (130, 60) → (2, 5).
    region = Point([(199, 99), (0, 0), (10, 10), [130, 60]])
    c0, groups = region_maps([Point(0, 0), region], SIZE, GRID)
    assert c0.shape == (32, 4) and groups == [[0], [1, 2, 3]]
    assert [cells_of(c0[:, j]) for j in (1, 2, 3)] == [{(0, 0)}, {(2, 5)}, {(3, 7)}]
    assert (c0.sum(0) == 1).all()


# ----------------------------------------------------------------------------------------------
# Boxes


@pytest.mark.parametrize(
    ("box", "rows", "cols"),
    [
        # rows ⌊20·4/100⌋ = 0 .. ⌊90·4/100⌋ = 3 (exclusive), cols ⌊30·8/200⌋ = 1 .. ⌊170·8/200⌋ = 6.
        (Box(30, 20, 170, 90), range(0, 3), range(1, 6)),
        # The whole image.
        (Box(0, 0, 200, 100), range(0, 4), range(0, 8)),
        # The demo's end-exclusive rule: corner pixel (50, 25) lies in cell (1, 2), excluded.
        (Box(0, 0, 50, 25), range(0, 1), range(0, 2)),
        # Corners as the demo's mouse gives them (last pixel 199, 99): the last row and column of
        # cells are excluded, as in the demo.
        (Box(0, 0, 199, 99), range(0, 3), range(0, 7)),
        # Inside one cell on both axes: the demo's range is empty; the box keeps its cell.
        (Box(10, 10, 20, 20), range(0, 1), range(0, 1)),
        # Empty on the rows only: one row of cells, columns 0 .. ⌊60·8/200⌋ = 2.
        (Box(10, 30, 60, 40), range(1, 2), range(0, 2)),
        # Float corners.
        (Box(24.9, 25.0, 75.1, 74.99), range(1, 2), range(0, 3)),
    ],
)
def test_box_cells(box, rows, cols):
    c0, groups = region_maps([box], SIZE, GRID)
    expected = torch.zeros(GRID)
    for r in rows:
        for c in cols:
            expected[r, c] = 1.0
    assert groups == [[0]]
    assert torch.equal(grid_of(c0[:, 0]), expected)


# ----------------------------------------------------------------------------------------------
# Lines

# 80×80 image on an 8×8 grid: cells of 10×10 px.
LSIZE, LGRID = (80, 80), (8, 8)


@pytest.mark.parametrize(
    ("points", "cells"),
    [
        # Horizontal through row 0: every column.
        ([(5, 5), (75, 5)], {(0, c) for c in range(8)}),
        # The diagonal passes exactly through the corners (10, 10), (20, 20), (30, 30): the
        # corner points lie in the lower-right cells, so only the diagonal cells.
        ([(5, 5), (35, 35)], {(0, 0), (1, 1), (2, 2), (3, 3)}),
        # Slope 1/2 from (0.5, 0.5) to (2.5, 1.5) in cells: crosses u = 1 at v = 0.75, v = 1 at
        # u = 1.5 and u = 2 at v = 1.25.
        ([(5, 5), (25, 15)], {(0, 0), (0, 1), (1, 1), (1, 2)}),
        # A polyline: right along row 0, then down column 2; (0, 2) once.
        ([(5, 5), (25, 5), (25, 25)], {(0, 0), (0, 1), (0, 2), (1, 2), (2, 2)}),
        # Reversed direction: the same cells.
        ([(25, 15), (5, 5)], {(0, 0), (0, 1), (1, 1), (1, 2)}),
        # Along a grid line (x = 20 exactly): column 2.
        ([(20, 5), (20, 35)], {(0, 2), (1, 2), (2, 2), (3, 2)}),
        # Both vertices in one cell.
        ([(1, 1), (8, 9)], {(0, 0)}),
        # Ends on the last pixel.
        ([(70, 79), (79, 79)], {(7, 7)}),
    ],
)
def test_line_cells_hand_listed(points, cells):
    listed = line_cells(points, LSIZE, LGRID)
    assert listed == sorted(cells)  # raster order, no duplicates
    c0, groups = region_maps([Line(points)], LSIZE, LGRID)
    assert groups == [list(range(len(cells)))]
    assert [cells_of(c0[:, j], LGRID).pop() for j in range(c0.shape[1])] == sorted(cells)
    assert (c0.sum(0) == 1).all() and (c0.sum(1) <= 1).all()  # one-hot, distinct cells


def test_line_on_a_non_square_image():
    # 100×200 on 4×8: x scales by 8/200, y by 4/100. (12.5, 12.5) → (0.5, 0.5) in cells,
    # (187.5, 12.5) → (7.5, 0.5): row 0, all 8 columns.
    assert line_cells([(12.5, 12.5), (187.5, 12.5)], SIZE, GRID) == [(0, c) for c in range(8)]


def test_a_40_cell_line_and_3_boxes_give_43_columns():
    # 512×512 on 64×64 (8 px cells): x = 4 .. 316 covers columns 0 .. ⌊316/8⌋ = 39.
    regions = [Line([(4, 100), (316, 100)]), Box(0, 0, 64, 64), Box(100, 100, 300, 200),
               Box(400, 300, 511, 511)]
    c0, groups = region_maps(regions, (512, 512), (64, 64))
    assert c0.shape == (4096, 43)
    assert groups == [list(range(40)), [40], [41], [42]]
    assert cells_of(c0[:, 40], (64, 64)) == {(r, c) for r in range(8) for c in range(8)}


def _segment_is_covered(a, b, size, grid, samples=400):
    """Independent check: the exact cells of many points along the segment all lie in the
    line's cells, and the cells form one 8-connected chain no longer than the segment allows."""
    cells = set(line_cells([a, b], size, grid))
    (h, w), (gh, gw) = size, grid
    for i in range(samples + 1):
        t = Fraction(i, samples)
        x = Fraction(a[0]) + t * (Fraction(b[0]) - Fraction(a[0]))
        y = Fraction(a[1]) + t * (Fraction(b[1]) - Fraction(a[1]))
        assert (math.floor(y * gh / h), math.floor(x * gw / w)) in cells
    ra, ca = math.floor(Fraction(a[1]) * gh / h), math.floor(Fraction(a[0]) * gw / w)
    rb, cb = math.floor(Fraction(b[1]) * gh / h), math.floor(Fraction(b[0]) * gw / w)
    assert len(cells) <= abs(ra - rb) + abs(ca - cb) + 1
    # 8-connected: a walk from the first cell reaches every cell.
    seen, todo = {(ra, ca)}, [(ra, ca)]
    while todo:
        r, c = todo.pop()
        for n in ((r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)):
            if n in cells and n not in seen:
                seen.add(n)
                todo.append(n)
    assert seen == cells and (rb, cb) in cells


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 120), w=st.integers(1, 120), gh=st.integers(1, 16), gw=st.integers(1, 16),
    fa=st.tuples(st.floats(0, 1, exclude_max=True), st.floats(0, 1, exclude_max=True)),
    fb=st.tuples(st.floats(0, 1, exclude_max=True), st.floats(0, 1, exclude_max=True)),
    integer=st.booleans(),
)
def test_line_cells_properties(h, w, gh, gw, fa, fb, integer):
    def pixel(f):
        x, y = f[0] * w, f[1] * h
        return (int(x), int(y)) if integer else (min(x, math.nextafter(w, 0)),
                                                  min(y, math.nextafter(h, 0)))

    _segment_is_covered(pixel(fa), pixel(fb), (h, w), (gh, gw))


# ----------------------------------------------------------------------------------------------
# Masks and area averaging


def supersampled_average(mask: np.ndarray, grid) -> np.ndarray:
    """Independent exact area average: repeat every pixel g_h × g_w times, so that each cell is
    exactly H × W sub-pixels, and take block means."""
    (h, w), (gh, gw) = mask.shape, grid
    fine = np.repeat(np.repeat(mask.astype(np.float64), gh, axis=0), gw, axis=1)
    return fine.reshape(gh, h, gw, w).mean(axis=(1, 3))


def test_mask_area_average_by_hand():
    # 6×6 on 4×4: cells of 1.5×1.5 px (area 2.25). Pixel (0, 0) lies in cell (0, 0): 1/2.25.
    # Pixel (1, 1) spans [1, 2)²: a quarter (0.25 px²) in each of cells (0..1, 0..1): 1/9 each.
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True
    c0, groups = region_maps([Mask(mask)], (6, 6), (4, 4))
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[0, 0] = 1 / 2.25 + 0.25 / 2.25
    expected[0, 1] = expected[1, 0] = expected[1, 1] = 0.25 / 2.25
    assert groups == [[0]] and c0.dtype == torch.float32
    torch.testing.assert_close(grid_of(c0[:, 0], (4, 4)).double(), expected, rtol=0, atol=1e-7)


def test_mask_divisible_is_block_mean_and_accepts_tensors():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0:2, 0:1] = True  # 2 of cell (0, 0)'s 4 pixels
    mask[4:8, 4:8] = True  # all of cells (2..3, 2..3)
    c0, _ = region_maps([Mask(mask)], (8, 8), (4, 4))
    expected = torch.zeros(4, 4)
    expected[0, 0] = 0.5
    expected[2:, 2:] = 1.0
    assert torch.equal(grid_of(c0[:, 0], (4, 4)), expected)
    # 0/1 integers are accepted as a mask.
    c1, _ = region_maps([Mask(mask.to(torch.uint8).numpy())], (8, 8), (4, 4))
    assert torch.equal(c0, c1)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), gh=st.integers(1, 9), gw=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1))
def test_mask_area_average_vs_supersampling(h, w, gh, gw, seed):
    mask = np.random.default_rng(seed).random((h, w)) < 0.4
    mask[seed % h, seed % w] = True  # never empty
    c0, _ = region_maps([Mask(mask)], (h, w), (gh, gw))
    expected = supersampled_average(mask, (gh, gw))
    np.testing.assert_allclose(c0[:, 0].reshape(gh, gw).numpy(), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Several regions, combination


def test_columns_and_groups_follow_the_region_order():
    regions = [Box(0, 0, 50, 50), Line([(5, 5), (60, 5)]), Point(199, 0), Mask(np.ones(SIZE, bool))]
    c0, groups = region_maps(regions, SIZE, GRID)
    # The line covers columns 0 .. ⌊60·8/200⌋ = 2 of row 0: 3 cells.
    assert groups == [[0], [1, 2, 3], [4], [5]]
    assert c0.shape == (32, 6)
    assert torch.equal(c0[:, 5], torch.ones(32))
    assert cells_of(c0[:, 4]) == {(0, 7)}


def test_combine_by_hand():
    # Column 0 [1, .5, 0] (max 1); column 1 [0, .4, .2] → [0, 1, .5]; mean [.5, .75, .25];
    # ÷ .75 → [2/3, 1, 1/3]. Region 1: column 2 all zero → zeros, not NaN.
    refined = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.4, 0.0], [0.0, 0.2, 0.0]])
    out = combine_region_maps(refined, [[0, 1], [2]])
    expected = torch.tensor([[2 / 3, 0.0], [1.0, 0.0], [1 / 3, 0.0]])
    torch.testing.assert_close(out, expected)
    # Leading dims are kept; each matrix is combined on its own.
    batched = torch.stack([refined, refined * 3])
    torch.testing.assert_close(combine_region_maps(batched, [[0, 1], [2]]),
                               torch.stack([expected, expected]))
    # One column per region: divided by its max only.
    torch.testing.assert_close(combine_region_maps(refined, [[1]]),
                               torch.tensor([[0.0], [1.0], [0.5]]))


def test_a_negative_point_is_built_like_a_point_and_flagged():
    c0, groups = region_maps([Point(130, 60), Point(10, 10, negative=True)], SIZE, GRID)
    assert groups == [[0], [1]] and [g.negative for g in groups] == [False, True]
    assert cells_of(c0[:, 0]) == {(2, 5)} and cells_of(c0[:, 1]) == {(0, 0)}
    assert Point(1, 2, negative=True) != Point(1, 2) and not Point(1, 2).negative


def test_combine_subtracts_the_negative_regions_by_hand():
    # Region 0 (one column) [1, .5, .2, 0]; negatives: column 1 [0, 2, 1, 0] → [0, 1, .5, 0] and
    # column 2 [.1, 0, .2, 0] → [.5, 0, 1, 0]; background = their max [.5, 1, 1, 0].
    # Region 0 → max(0, [1, .5, .2, 0] − [.5, 1, 1, 0]) = [.5, 0, 0, 0], not divided again;
    # the negative regions' own maps are zeros.
    refined = torch.tensor([[1.0, 0.0, 0.1], [0.5, 2.0, 0.0], [0.2, 1.0, 0.2], [0.0, 0.0, 0.0]])
    groups = [RegionGroup([0]), RegionGroup([1], negative=True), RegionGroup([2], negative=True)]
    out = combine_region_maps(refined, groups)
    expected = torch.tensor([[0.5, 0, 0], [0.0, 0, 0], [0.0, 0, 0], [0.0, 0, 0]])
    torch.testing.assert_close(out, expected)
    # without negatives: exactly the plain combination
    plain = [RegionGroup([0]), RegionGroup([1]), RegionGroup([2])]
    torch.testing.assert_close(combine_region_maps(refined, plain), combine_region_maps(refined, [[0], [1], [2]]))


def test_only_negative_points_are_refused():
    with pytest.raises(ValueError, match="only negative points"):
        validate_regions([Point(1, 1, negative=True)], SIZE)
    with pytest.raises(TypeError, match=r"regions\[0\] \(Point\) negative must be True or False"):
        validate_regions([Point(1, 1, negative="yes")], SIZE)


def test_combine_never_gives_nan():
    refined = torch.zeros(5, 3)
    refined[:, 1] = -1.0  # a non-positive maximum
    out = combine_region_maps(refined, [[0, 1, 2], [1]])
    assert torch.equal(out, torch.zeros(5, 2))


@pytest.mark.parametrize(
    ("refined", "groups", "error", "match"),
    [
        (torch.zeros(4, 2), [], ValueError, "groups must be a non-empty"),
        (torch.zeros(4, 2), [[]], ValueError, r"groups\[0\] must be a non-empty"),
        (torch.zeros(4, 2), [[0], [2]], ValueError, r"groups\[1\] has column 2"),
        (torch.zeros(4, 2), [[-1]], ValueError, r"groups\[0\] has column -1"),
        (torch.zeros(4, 2, dtype=torch.int64), [[0]], TypeError, "floating-point"),
        (np.zeros((4, 2)), [[0]], TypeError, "floating-point"),
        (torch.zeros(4), [[0]], ValueError, r"\[\.\.\., HW, M\]"),
    ],
)
def test_combine_rejects(refined, groups, error, match):
    with pytest.raises(error, match=match):
        combine_region_maps(refined, groups)


# ----------------------------------------------------------------------------------------------
# Label maps (refine_masks)


def test_label_map_with_ignore_pixels_by_hand():
    label_map = torch.tensor(
        [[1, 1, 0, 255],
         [1, 255, 0, 0],
         [3, 3, 255, 255],
         [0, 3, 255, 255]],
        dtype=torch.uint8,
    )
    c0, ids = label_map_seeds(label_map, (2, 2))
    # Cells of 2×2 px. (0, 0): 1, 1, 1, ignore → class 1 on 3 of 3 valid pixels.
    # (0, 1): 0, ignore, 0, 0 → nothing. (1, 0): 3, 3, 0, 3 → class 3 on 3 of 4.
    # (1, 1): all ignore → 0 (not NaN).
    assert ids == [1, 3]
    expected = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.75], [0.0, 0.0]])
    assert c0.dtype == torch.float32
    torch.testing.assert_close(c0, expected)


def test_label_map_non_divisible_vs_supersampling():
    rng = np.random.default_rng(0)
    label_map = rng.choice([0, 2, 7, 255], size=(13, 9)).astype(np.int32)
    c0, ids = label_map_seeds(label_map, (4, 3))
    assert ids == [2, 7]
    valid = supersampled_average(label_map != 255, (4, 3))
    for j, v in enumerate(ids):
        area = supersampled_average(label_map == v, (4, 3))
        expected = np.where(valid > 0, area / np.where(valid > 0, valid, 1), 0)
        np.testing.assert_allclose(c0[:, j].reshape(4, 3).numpy(), expected, rtol=0, atol=1e-6)


def test_label_map_without_classes_gives_no_columns():
    c0, ids = label_map_seeds(torch.tensor([[0, 255], [0, 0]]), (1, 1))
    assert c0.shape == (1, 0) and ids == []


def test_soft_maps_are_area_averaged():
    soft = torch.zeros(2, 4, 4)
    soft[0, :2, :2] = 0.8  # cell (0, 0) of 2×2 cells
    soft[1, 3, 3] = 1.0  # a quarter of cell (1, 1)
    c0, ids = label_map_seeds(soft.numpy(), 2)
    assert ids == [1, 2]
    torch.testing.assert_close(c0, torch.tensor([[0.8, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.25]]))


@pytest.mark.parametrize(
    ("label_map", "error", "match"),
    [
        (torch.tensor([[0, 256]]), ValueError, "class id 256 ≥ 255"),
        (np.array([[1, 300]]), ValueError, "class id 300"),
        (torch.tensor([[-1, 1]]), ValueError, "negative class id"),
        (torch.tensor([[0.0, 1.0]]), TypeError, "integer class ids"),
        (torch.tensor([[True, False]]), TypeError, "integer class ids"),
        (torch.zeros(1, 2, 2, 2), ValueError, r"\[H, W\] ids or \[K, H, W\]"),
        (torch.zeros(5, dtype=torch.int64), ValueError, r"\[H, W\] ids or \[K, H, W\]"),
        (torch.zeros(0, 4, dtype=torch.int64), ValueError, "non-empty"),
        (torch.full((1, 2, 2), float("nan")), ValueError, "NaN or Inf"),
        (torch.ones(1, 2, 2, dtype=torch.bool), TypeError, "real numbers"),
        ([[0, 1]], TypeError, "tensor or NumPy array"),
    ],
)
def test_label_map_rejects(label_map, error, match):
    with pytest.raises(error, match=match):
        label_map_seeds(label_map, (2, 2))


# ----------------------------------------------------------------------------------------------
# Bad regions


BAD_REGIONS = [
    # (id, regions, error, match)
    ("empty", [], ValueError, "regions is empty"),
    ("not-a-list", Point(1, 1), TypeError, "regions must be a list"),
    ("wrong-type", [Point(1, 1), (3, 4)],
     TypeError, r"regions\[1\] must be a Point, Box, Line or Mask"),
    ("point-x=W", [Point(200, 10)], ValueError, r"regions\[0\] \(Point\) point 0 .*outside"),
    ("point-negative", [Box(0, 0, 5, 5), Point(-1, 10)], ValueError, r"regions\[1\].*outside"),
    ("point-y=H", [Point(10, 100)], ValueError, r"regions\[0\].*outside"),
    ("point-nan", [Point(float("nan"), 10)],
     ValueError, r"regions\[0\] \(Point\) point 0 x is nan"),
    ("point-inf", [Point(5, float("inf"))], ValueError, r"regions\[0\].* y is inf"),
    ("point-str", [Point("5", 6)], TypeError, r"regions\[0\].* x must be a number"),
    ("point-bool", [Point(True, 6)], TypeError, r"regions\[0\].* x must be a number"),
    ("point-no-y", [Point(5)], TypeError, r"regions\[0\].* y must be a number"),
    ("multi-point-empty", [Point([])], ValueError, r"regions\[0\] \(Point\) has no points"),
    ("multi-point-bad", [Point([(1, 2), (3, 4, 5)])],
     ValueError, r"point 1 must be an \(x, y\) pair"),
    ("multi-point-outside", [Point([(1, 2), (300, 4)])], ValueError, r"point 1 .*outside"),
    ("box-x1<=x0", [Point(1, 1), Box(50, 10, 50, 20)],
     ValueError, r"regions\[1\] \(Box\): x1 \(50\) must be > x0"),
    ("box-x1<x0", [Box(60, 10, 50, 20)], ValueError, r"x1 \(50\) must be > x0 \(60\)"),
    ("box-y1<=y0", [Box(10, 20, 50, 20)], ValueError, r"y1 \(20\) must be > y0 \(20\)"),
    ("box-outside", [Box(10, 20, 201, 30)], ValueError, r"regions\[0\] \(Box\).*outside"),
    ("box-negative", [Box(-5, 20, 20, 30)], ValueError, "outside"),
    ("box-nan", [Box(0, float("nan"), 20, 30)], ValueError, r"regions\[0\] \(Box\) y0 is nan"),
    ("box-none", [Box(0, None, 20, 30)], TypeError, r"y0 must be a number"),
    ("line-1-vertex", [Line([(1, 1)])],
     ValueError, r"regions\[0\] \(Line\) needs at least 2 vertices, got 1"),
    ("line-0-vertices", [Line([])], ValueError, "at least 2 vertices, got 0"),
    ("line-outside", [Line([(1, 1), (5, 150)])],
     ValueError, r"regions\[0\] \(Line\) vertex 1 .*outside"),
    ("line-nan", [Line([(1, 1), (float("nan"), 5)])], ValueError, r"vertex 1 x is nan"),
    ("line-not-pairs", [Line("abc")], TypeError, r"regions\[0\] \(Line\) needs a list"),
    ("line-vertex-number", [Line([(1, 1), 5])], TypeError, r"vertex 1 must be an \(x, y\) pair"),
    ("mask-size", [Mask(np.ones((100, 199), bool))],
     ValueError, r"regions\[0\] \(Mask\) mask is 100×199 but the image is 100×200"),
    ("mask-transposed", [Mask(np.ones((200, 100), bool))],
     ValueError, "200×100 but the image is 100×200"),
    ("mask-empty", [Mask(np.zeros(SIZE, bool))], ValueError, "selects no pixel"),
    ("mask-float", [Mask(np.ones(SIZE, np.float32))], TypeError, "bool"),
    ("mask-ints", [Mask(np.full(SIZE, 2, np.uint8))], ValueError, "other than 0 and 1"),
    ("mask-list", [Mask([[True]])], TypeError, r"regions\[0\] \(Mask\) mask must be a bool"),
]


@pytest.mark.parametrize(("regions", "error", "match"),
                         [pytest.param(*c[1:], id=c[0]) for c in BAD_REGIONS])
def test_bad_regions(regions, error, match):
    with pytest.raises(error, match=match):
        validate_regions(regions, SIZE)
    with pytest.raises(error, match=match):  # region_maps validates the same way
        region_maps(regions, SIZE, GRID)


@pytest.mark.parametrize(
    ("image_size", "grid", "error", "match"),
    [
        ((100,), GRID, TypeError, "image_size must be a pair"),
        ((100.0, 200), GRID, TypeError, "image_size must be a pair"),
        ((0, 200), GRID, ValueError, "image_size must be positive"),
        (SIZE, (4, 0), ValueError, "grid must be positive"),
        (SIZE, "64", TypeError, "grid must be a pair"),
    ],
)
def test_bad_sizes(image_size, grid, error, match):
    with pytest.raises(error, match=match):
        region_maps([Point(1, 1)], image_size, grid)


def test_valid_regions_pass_and_int_grid_is_square():
    validate_regions([Point(0, 0), Box(0, 0, 200, 100), Line([(0, 0), (199, 99)]),
                      Mask(np.ones(SIZE, bool))], SIZE)
    a, _ = region_maps([Point(50, 50)], (100, 100), 4)
    b, _ = region_maps([Point(50, 50)], (100, 100), (4, 4))
    assert torch.equal(a, b)


def test_region_classes():
    assert Point(1, 2) == Point([(1, 2)]) and Point(1, 2).points == ((1, 2),)
    assert Line([[1, 2], [3, 4]]).points == ((1, 2), (3, 4))
    assert Box(1, 2, 3, 4) == Box(x0=1, y0=2, x1=3, y1=4)
    with pytest.raises(AttributeError):
        Box(1, 2, 3, 4).x0 = 5  # frozen
