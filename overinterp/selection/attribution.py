"""Attribution selectors: rank pixels by a Captum attribution of p(c), then compute the p(c) curve.

Methods (`method` argument):
- "gradient": vanilla gradient (captum Saliency), importance = sum over channels of |d p(c) / dx|.
  Absolute, as in Simonyan et al. 2014 and Saliency's default: masking moves each channel to 0
  from either side, so the sign of the gradient alone does not say whether removing a pixel
  raises or lowers p(c); its magnitude is the sensitivity.
- "ig": integrated gradients (captum IntegratedGradients) from the baseline 0 = the mean colour,
  Captum's defaults (n_steps 50, Gauss-Legendre). Signed: the attributions sum to
  p(c | x) − p(c | all masked), each pixel's share of what masking everything costs; a negative
  pixel lowers p(c), so removing it first keeps p(c) high — the deletion reading of BS.
- "occlusion": captum Occlusion with a window of `window` x `window` pixels over all channels,
  stride 1, baseline 0. Signed: a pixel's score is p(c | x) − p(c | window masked), averaged over
  the windows covering it; at window 1 these are exactly the scores of BS's first step.
- "captum:<ClassName>": any class of captum.attr whose constructor takes only the forward
  function (InputXGradient, FeatureAblation, DeepLift, GuidedBackprop, ShapleyValueSampling, ...).
  Its parameters are keyword arguments of its `attribute()` (JSON values only), plus our own
  "importance": "signed" (default) or "abs". Methods with a `feature_mask` get one feature per
  pixel (all channels together), methods with `perturbations_per_eval` get the curve's chunk.
  Sampling methods (Lime, KernelShap, ShapleyValueSampling, GradientShap) draw from torch's
  global RNG and FeaturePermutation permutes across the batch, so their results depend on the
  batch; the built-in methods do not (tests/test_attribution.py).
Names, parameters and their defaults are checked in params.py (`check_selector_params`).

Every method attributes the softmax probability p(c) of the explained class (as BS and BGSIS
score it), is given the whole batch with per-image targets, and its importance per pixel is the
sum over channels. Pixels are removed least important first, ties to the lowest index.
forward_passes counts Captum's internal passes too (per method in cost.py).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn as nn

from overinterp.selection.engine import EngineConfig, ForwardFunc, PassesFunc, Scorer, SelectionResult, check_images, widen
from overinterp.selection.params import captum_class, check_selector_params, positive_int
from overinterp.selection.ranking import explain, scored_result


class _CountingProb(nn.Module):
    """p = softmax(forward(x)) in fp32 or wider; counts the images it evaluates (and tells
    on_passes of each call's, a shape: no host sync).

    A Module (holding the model as a submodule when it is one) so hook-based Captum methods work.
    """

    def __init__(self, forward: ForwardFunc, on_passes: Optional[PassesFunc] = None):
        super().__init__()
        self.inner = forward
        self.images = 0
        self.on_passes = on_passes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        out = torch.softmax(widen(self.inner(x)), 1)
        if self.on_passes is not None:
            self.on_passes(int(x.shape[0]))
        return out


def attribution_selection(
    forward: ForwardFunc,
    images: torch.Tensor,
    method: str,
    *,
    target: Optional[torch.Tensor] = None,
    params: Optional[dict] = None,
    config: EngineConfig = EngineConfig(),
    steps_per_pass: Optional[int] = None,
    on_passes: Optional[PassesFunc] = None,
) -> SelectionResult:
    """Rank pixels by a Captum attribution of p(c) and compute the p(c) curve of the ranking.

    Args:
        forward, images, target: as every selector takes them (engine.py); Captum gets the whole batch.
        method: "gradient", "ig", "occlusion" or "captum:<ClassName>" (see the module docstring).
        params: the method's parameters (`check_selector_params`); None = defaults.
        config: how the curve's (and occlusion's) forward passes are batched (EngineConfig).
        steps_per_pass: ig only — interpolation steps per forward + backward pass (B·steps_per_pass
            images at once); None = all n_steps at once. Bounds memory; any value gives every
            image the same steps per pass whatever the batch, so batching never changes a result.
        on_passes: called with the forward passes made, per model call of the attribution and per
            chunk of the curve (see engine.PassesFunc).
    Returns:
        SelectionResult: order (B, HW) least important first, curve (B, HW), step_sizes (1,)*HW.
    """
    resolved = check_selector_params(method, params)  # before any model work
    if method == "perturbation":
        raise ValueError("perturbation is not an attribution method: call meaningful_perturbation")
    check_images(images)
    if steps_per_pass is not None:
        positive_int("ig", "steps_per_pass", steps_per_pass)
    B, C, H, W = images.shape
    if method == "occlusion" and resolved["window"] > min(H, W):
        raise ValueError(f"occlusion window must be at most the image side {min(H, W)}, got {resolved['window']}")
    scorer = Scorer(forward, config, images)  # fixes the model's memory format before it runs
    explained = explain(scorer, images, target)
    prob = _CountingProb(forward, on_passes)
    attr = _attribute(prob, images, method, resolved, explained[0], scorer.chunk, steps_per_pass)
    if attr.shape != images.shape:
        raise ValueError(f"{method} returned attributions of shape {tuple(attr.shape)}, not one per input element "
                         f"{tuple(images.shape)}: it does not rank pixels")
    importance = attr.detach().sum(1).reshape(B, H * W)  # (B, HW): channels summed
    return scored_result(scorer, images, importance, explained, prob.images, on_passes)


def _attribute(prob: _CountingProb, images, method: str, params: dict, target, chunk: int, steps_per_pass):
    """(B, C, H, W) attributions of p(target) by the named method."""
    import captum.attr as ca

    B, C, H, W = images.shape
    images = images.detach().requires_grad_(True)  # Captum would set it (with a warning) for gradient methods
    if method == "gradient":
        return ca.Saliency(prob).attribute(images, target=target, abs=True)
    if method == "ig":
        ibs = None if steps_per_pass is None else B * min(steps_per_pass, params["n_steps"])
        return ca.IntegratedGradients(prob).attribute(
            images, baselines=0.0, target=target, n_steps=params["n_steps"], method=params["method"], internal_batch_size=ibs)
    if method == "occlusion":
        w = params["window"]
        return ca.Occlusion(prob).attribute(
            images, sliding_window_shapes=(C, w, w), strides=(C, 1, 1), baselines=0.0, target=target,
            perturbations_per_eval=max(1, chunk // B))
    cls = captum_class(method)
    # JSON has no tuples; Captum wants them (window shapes, strides)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k != "importance"}
    sig = inspect.signature(cls.attribute).parameters
    if "feature_mask" in sig and "feature_mask" not in kwargs:  # one feature per pixel, all channels
        kwargs["feature_mask"] = torch.arange(H * W, device=images.device).view(1, 1, H, W)
    if "perturbations_per_eval" in sig and "perturbations_per_eval" not in kwargs:
        kwargs["perturbations_per_eval"] = max(1, chunk // B)
    if "baselines" in sig and sig["baselines"].default is inspect.Parameter.empty and "baselines" not in kwargs:
        kwargs["baselines"] = torch.zeros_like(images[:1])  # the mean colour (e.g. GradientShap's distribution)
    out = cls(prob).attribute(images, target=target, **kwargs)
    out = out[0] if isinstance(out, tuple) else out  # (attributions, delta) when a delta was asked for
    return out.abs() if params["importance"] == "abs" else out
