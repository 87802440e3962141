"""The fills against a direct sparse solve built pixel by pixel, and hand-computed cases."""

import numpy as np
import pytest
import torch
from scipy.sparse import lil_matrix
from scipy.sparse.linalg import spsolve

from overinterp.fill import FILLS, fill, solve_road
from overinterp.selection.subsets import apply_mask

# ROAD's neighbours: (row offset, column offset) -> weight
OFFSETS = {(-1, 0): 1 / 6, (1, 0): 1 / 6, (0, -1): 1 / 6, (0, 1): 1 / 6,
           (-1, -1): 1 / 12, (-1, 1): 1 / 12, (1, -1): 1 / 12, (1, 1): 1 / 12}


def direct_road(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The twin: x (C, H, W) float64, keep (H, W) bool -> imputed image, no noise.

    One equation per removed pixel: (sum of its in-image neighbours' weights) * x_u
    - sum over removed neighbours w * x_v = sum over kept neighbours w * x_k; spsolve.
    """
    C, H, W = x.shape
    removed = [(i, j) for i in range(H) for j in range(W) if not keep[i, j]]
    var = {pix: n for n, pix in enumerate(removed)}
    A = lil_matrix((len(removed), len(removed)))
    b = np.zeros((len(removed), C))
    for n, (i, j) in enumerate(removed):
        for (di, dj), w in OFFSETS.items():
            ii, jj = i + di, j + dj
            if not (0 <= ii < H and 0 <= jj < W):
                continue  # outside the image: dropped, the rest renormalised
            A[n, n] += w
            if keep[ii, jj]:
                b[n] += w * x[:, ii, jj]
            else:
                A[n, var[(ii, jj)]] -= w
    out = x.copy()
    if removed:
        sol = spsolve(A.tocsc(), b).reshape(len(removed), C)
        for n, (i, j) in enumerate(removed):
            out[:, i, j] = sol[n]
    return out


def masks(H, W, seed=0):
    """Several (H*W,) keep masks: random 50%, 90% removed, a kept border ring removed, one pixel kept."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.rand(H * W, generator=g)
    border = torch.zeros(H, W, dtype=torch.bool)
    border[1:-1, 1:-1] = True  # keep the inside, remove the whole border
    corner = torch.zeros(H * W, dtype=torch.bool)
    corner[0] = True
    return {"half": rand > 0.5, "ninety": rand > 0.9, "border": border.flatten(), "one_corner": corner}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ["half", "ninety", "border", "one_corner"])
def test_road_matches_direct_sparse_solve(channels, kind):
    H, W = 5, 7
    g = torch.Generator().manual_seed(channels)
    x = torch.randn(1, channels, H, W, generator=g)
    keep = masks(H, W)[kind][None]
    ref = direct_road(x[0].double().numpy(), keep.view(H, W).numpy())
    got = fill(x, keep, "road", noise_std=0.0)
    assert np.abs(got[0].double().numpy() - ref).max() < 1e-4
    got64 = fill(x.double(), keep, "road", noise_std=0.0, tol=1e-12)  # float64: the same system exactly
    assert np.abs(got64[0].numpy() - ref).max() < 1e-9


def test_hand_computed_centre_and_corner():
    # one removed pixel in the centre: (edge sum) / 6 + (diagonal sum) / 12
    x = torch.tensor([[12.0, 1.0, 24.0], [2.0, 99.0, 3.0], [36.0, 4.0, 48.0]]).view(1, 1, 3, 3)
    keep = torch.ones(1, 9, dtype=torch.bool)
    keep[0, 4] = False
    got = fill(x, keep, "road", noise_std=0.0)
    assert got[0, 0, 1, 1].item() == pytest.approx(10 / 6 + 120 / 12, abs=1e-5)  # 11.667; 1/8 each would give 16.25
    # one removed corner pixel: neighbours (0,1), (1,0) at 1/6 and (1,1) at 1/12, renormalised by 5/12
    keep = torch.ones(1, 9, dtype=torch.bool)
    keep[0, 0] = False
    got = fill(x, keep, "road", noise_std=0.0)
    assert got[0, 0, 0, 0].item() == pytest.approx((2 * 1.0 + 2 * 2.0 + 99.0) / 5, abs=1e-5)


def test_kept_pixels_unchanged_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 6, 6, generator=g)
    keep = torch.rand(4, 36, generator=g) > 0.6
    for how in FILLS:
        out = fill(x, keep, how, generator=torch.Generator().manual_seed(0))
        k = keep.view(4, 1, 6, 6).expand_as(x)
        assert torch.equal(out[k], x[k])


def test_mean_is_apply_mask():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 5, 7, generator=g)
    keep = torch.rand(3, 35, generator=g) > 0.5
    assert torch.equal(fill(x, keep), apply_mask(x, keep))
    assert torch.equal(fill(x, keep, "mean"), apply_mask(x, keep))


def test_batch_equals_each_alone():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, 8, 9, generator=g)
    keep = torch.rand(5, 72, generator=g) > torch.linspace(0.1, 0.95, 5)[:, None]  # easy to hard
    batch, _ = solve_road(x, keep)
    for i in range(5):
        alone, _ = solve_road(x[i : i + 1], keep[i : i + 1])
        assert torch.allclose(batch[i], alone[0], atol=1e-6)


def test_none_removed_and_all_removed():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, 5, generator=g)
    everything = torch.ones(2, 20, dtype=torch.bool)
    assert torch.equal(fill(x, everything, "road"), x)
    nothing = torch.zeros(2, 20, dtype=torch.bool)
    assert torch.equal(fill(x, nothing, "road", noise_std=0.0), torch.zeros_like(x))  # the mean colour
    noisy = fill(x, nothing, "road", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(noisy).all() and 0 < noisy.abs().max() < 0.1
    # one image empty, one full, one half: each as if alone
    mixed = torch.stack([nothing[0], everything[0], torch.arange(20) % 2 == 0])
    x3 = torch.cat([x, x[:1]])
    got = fill(x3, mixed, "road", noise_std=0.0)
    assert torch.equal(got[0], torch.zeros_like(x[0])) and torch.equal(got[1], x[1])
    ref = direct_road(x3[2].double().numpy(), mixed[2].view(4, 5).numpy())
    assert np.abs(got[2].double().numpy() - ref).max() < 1e-4


def test_noise_seeded_and_sigma_in_pixel_units():
    x = torch.zeros(2, 3, 64, 64)  # kept pixels all 0 -> the linear part is 0, only noise remains
    keep = torch.zeros(2, 64 * 64, dtype=torch.bool)
    keep[:, ::7] = True
    std = (0.5, 0.25, 0.1)
    a = fill(x, keep, "road", std=std, generator=torch.Generator().manual_seed(1))
    b = fill(x, keep, "road", std=std, generator=torch.Generator().manual_seed(1))
    c = fill(x, keep, "road", std=std, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    removed = ~keep.view(2, 1, 64, 64).expand_as(x)
    for ch, s in enumerate(std):  # σ = 0.01 in [0, 1] units is 0.01 / std in normalised units
        vals = a[:, ch][removed[:, ch]]
        assert vals.std().item() == pytest.approx(0.01 / s, rel=0.05)
        assert abs(vals.mean().item()) < 0.05 * 0.01 / s
    plain = fill(x, keep, "road", generator=torch.Generator().manual_seed(1))  # std=None: x's units
    assert plain[removed].std().item() == pytest.approx(0.01, rel=0.05)


def test_per_image_seeds_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 3, 6, 6, generator=g)
    keep = torch.rand(3, 36, generator=g) > 0.5
    batch = fill(x, keep, "road", seeds=[10, 11, 12])
    alone = fill(x[2:], keep[2:], "road", seeds=[12])
    assert torch.allclose(batch[2], alone[0], atol=1e-6)
    other = fill(x, keep, "road", seeds=[10, 11, 13])
    assert torch.equal(batch[:2], other[:2]) and not torch.equal(batch[2], other[2])


def test_bad_arguments_name_the_fix():
    x = torch.zeros(2, 3, 4, 4)
    keep = torch.ones(2, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="choose one of mean, road"):
        fill(x, keep, "blur")
    with pytest.raises(ValueError, match="bool"):
        fill(x, keep.float(), "road")
    with pytest.raises(ValueError, match="one value per channel"):
        fill(x, keep, "road", std=(0.5,))
    with pytest.raises(ValueError, match="one seed per image"):
        fill(x, keep, "road", seeds=[1])


def test_cap_warns():
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    keep = torch.zeros(1, 256, dtype=torch.bool)
    keep[0, 0] = True
    with pytest.warns(UserWarning, match="max_iter=3"):
        solve_road(x, keep, max_iter=3)
