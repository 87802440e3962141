"""Why the subsets carry the label: guided generation of counterfactuals and disagreement images
(after Augustin et al., DiG-IN, CVPR 2024), with a diffusion prior trained on the data set itself.

Layout, each module importing only those above it:
- pixels.py — the one place images move between uint8, the diffusion model's [-1, 1] and a
  classifier's normalised units;
- ddim.py — the deterministic DDIM chain: a denoiser's (eps, x0) prediction, sampling, inversion;
- prior.py — the prior: PriorConfig, resumable train_prior, sample, load_generator (any diffusers
  pixel-space pipeline saved with save_pretrained);
- objectives.py — what guidance minimises: VCE, disagreement, class visualisation;
- guided.py — the two guidance methods, by name: "noise" (DiG-IN: Adam on x_T through the
  checkpointed DDIM chain) and "universal" (the objective's gradient through x̂0 at every step);
- measures.py — success, distance, transfer, the PGD baseline, Fréchet distance and a
  real-vs-generated discriminator, all without pretrained feature networks.

Nothing here imports ray or mlflow; diffusers is the `explain` extra and loads only with prior.py.
"""

# torch-free names, so that the run's config can check its flags without loading the science
QUESTIONS = ("vce", "disagree")  # what `overinterp run --explain` asks (study.py)
GUIDANCE_METHODS = ("noise", "universal")  # guided.METHODS, by name
MAX_VCE_TARGETS = 9  # a VCE question turns each test image into at most this many other classes
