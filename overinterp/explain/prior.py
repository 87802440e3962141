"""A diffusion prior that needs no hub: a small diffusers UNet2DModel trained on the data set
itself (DDPM's noise-prediction loss), sampled with the deterministic DDIM chain (ddim.py).

- PriorConfig: the training and sampling settings, checked where they enter;
- train_prior: resumable training — a checkpoint (weights, optimizer, step, loss curve, config,
  a fingerprint of the images) is written atomically every `checkpoint_every` steps, and a call
  with the same folder continues from it;
- sample: unguided DDIM samples; as_denoiser: a trained UNet as the ddim.Denoiser guidance needs;
- load_generator: any pixel-space diffusers pipeline saved with save_pretrained (a local folder,
  or a hub id the user can reach) as a Denoiser.

Reproducibility: weights are initialised from `seed`, and step k draws its batch, timesteps and
noise from a generator seeded with (seed, k) alone, so a resumed run makes the same draws as an
uninterrupted one and ends with the same weights.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from overinterp.explain.ddim import Denoiser, PREDICTION_TYPES, ddim_sample, initial_noise
from overinterp.explain.pixels import diffusion_to_uint8, uint8_to_diffusion
from overinterp.models import device_of

CHECKPOINT_NAME = "prior.pt"
CHECKPOINT_FORMAT = 1
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class PriorConfig:
    """Settings of the prior; the defaults suit the 8x8 digits (about 0.1 s a step on one CPU thread).

    steps: optimizer steps in all (a rerun with more steps continues a saved run);
    channels: UNet2DModel's block_out_channels, one per resolution (each block but the last halves
        the image: 8x8 takes 2 or 3 blocks, 32x32 up to 4);
    norm_groups: GroupNorm groups, must divide every entry of channels;
    train_timesteps: T of the DDPM noise schedule; sample_steps: DDIM steps when sampling;
    checkpoint_every: steps between checkpoints (and log calls).
    """

    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_groups: int = 8
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # the cosine schedule: the linear one destroys small images too early
    sample_steps: int = 25
    checkpoint_every: int = 250

    # fields a saved run may differ in: they do not change the steps already taken
    RESUMABLE_CHANGES = ("steps", "sample_steps", "checkpoint_every")

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))  # lists from JSON or asdict
        for name in ("steps", "batch_size", "layers_per_block", "norm_groups", "train_timesteps", "sample_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"PriorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"PriorConfig.lr must be > 0, got {self.lr}")
        if not self.channels or any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"PriorConfig.channels {self.channels} must be non-empty multiples of norm_groups={self.norm_groups}: "
                             "change either")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"PriorConfig.beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {self.beta_schedule!r}")
        if self.sample_steps > self.train_timesteps:
            raise ValueError(f"PriorConfig.sample_steps={self.sample_steps} exceeds train_timesteps={self.train_timesteps}: lower it")

    def training_fields(self) -> dict:
        """The fields that fix the trajectory of training (all but RESUMABLE_CHANGES)."""
        return {k: v for k, v in asdict(self).items() if k not in self.RESUMABLE_CHANGES}


def make_unet(config: PriorConfig, image_size: int, channels: int):
    """A fresh UNet2DModel for (channels, image_size, image_size) images, initialised from config.seed."""
    from diffusers import UNet2DModel

    if image_size % 2 ** (len(config.channels) - 1):
        raise ValueError(f"{image_size}x{image_size} images cannot be halved {len(config.channels) - 1} times: "
                         f"give PriorConfig.channels fewer entries")
    torch.manual_seed(config.seed)
    n = len(config.channels)
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, block_out_channels=config.channels,
                       layers_per_block=config.layers_per_block, norm_num_groups=config.norm_groups,
                       down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n)


def make_scheduler(config: PriorConfig, kind: str = "ddim"):
    """The noise schedule: DDPMScheduler for training (noising), DDIMScheduler for sampling (same ᾱ)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    kw = {"clip_sample": False, "set_alpha_to_one": True} if kind == "ddim" else {"clip_sample": False}
    return cls(num_train_timesteps=config.train_timesteps, beta_schedule=config.beta_schedule, **kw)


def as_denoiser(unet, config: PriorConfig) -> Denoiser:
    """A trained prior as the Denoiser the DDIM chain and guidance run on."""
    size = unet.config.sample_size
    return Denoiser(unet.eval(), make_scheduler(config), (unet.config.in_channels, size, size))


def fingerprint(images: np.ndarray | torch.Tensor, mean, std) -> str:
    """sha256 of the training images (shape and bytes) and their normalisation constants."""
    arr = np.ascontiguousarray(images.cpu().numpy() if isinstance(images, torch.Tensor) else images)
    h = hashlib.sha256(repr((arr.shape, str(arr.dtype), tuple(mean), tuple(std))).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _save_atomic(path: str, state: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a reader sees the old checkpoint or the new one, never half of one


def load_checkpoint(checkpoint_dir: str) -> Optional[dict]:
    """The saved training state in checkpoint_dir, or None when there is none."""
    path = os.path.join(checkpoint_dir, CHECKPOINT_NAME)
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a prior checkpoint of format {CHECKPOINT_FORMAT}: delete it or use another checkpoint_dir")
    return state


def _check_resume(state: dict, config: PriorConfig, data: str, path: str) -> None:
    saved = PriorConfig(**state["config"]).training_fields()
    diff = {k: (saved[k], v) for k, v in config.training_fields().items() if saved[k] != v}
    if diff:
        shown = ", ".join(f"{k}: saved {a!r}, given {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{path} holds a prior trained with another config ({shown}): use another checkpoint_dir, "
                         f"delete the checkpoint, or pass the saved values (only {', '.join(PriorConfig.RESUMABLE_CHANGES)} may change)")
    if state["data"] != data:
        raise ValueError(f"{path} holds a prior trained on other images (or other mean/std): use another checkpoint_dir "
                         "or delete the checkpoint")


def train_prior(images_uint8: np.ndarray | torch.Tensor, mean, std, config: PriorConfig, checkpoint_dir: Optional[str] = None,
                log: Optional[Callable[[int, float], None]] = None, device: torch.device | str = "cpu"):
    """Train (or continue training) a diffusion prior on uint8 images with DDPM's loss.

    Args:
        images_uint8: (N, C, H, W) uint8, H == W; trained on in diffusion units [-1, 1].
        mean, std: the data set's normalisation constants; the prior does not use them, but they are
            part of the data's fingerprint, so a checkpoint is never resumed on other data.
        config: PriorConfig. A saved run in checkpoint_dir continues if its config agrees in every
            field but steps, sample_steps and checkpoint_every (else ValueError naming the fields).
        checkpoint_dir: where prior.pt is written every config.checkpoint_every steps and at the end;
            None: no checkpoints.
        log: called as log(step, mean loss of the last checkpoint_every steps) at every checkpoint.
    Returns:
        (unet in eval mode, losses): losses is the per-step MSE list of the whole run, saved steps
        included (length config.steps, or the saved length if that is longer).
    """
    images = torch.as_tensor(np.asarray(images_uint8) if not isinstance(images_uint8, torch.Tensor) else images_uint8)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"train_prior wants square uint8 images (N, C, H, H), got {tuple(images.shape)} {images.dtype}")
    n, c, size = images.shape[0], images.shape[1], images.shape[2]
    data = fingerprint(images, mean, std)
    unet = make_unet(config, size, c).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    noise_sched = make_scheduler(config, "ddpm")
    ac = noise_sched.alphas_cumprod.to(device)  # (T,) ᾱ_t
    losses: list[float] = []
    start = 0
    path = os.path.join(checkpoint_dir, CHECKPOINT_NAME) if checkpoint_dir else None
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
        state = load_checkpoint(checkpoint_dir)
        if state is not None:
            _check_resume(state, config, data, path)
            unet.load_state_dict(state["unet"])
            opt.load_state_dict(state["optimizer"])
            start, losses = state["step"], list(state["losses"])

    x_all = uint8_to_diffusion(images).to(device)  # (N, C, H, W) in [-1, 1]
    pending: list[torch.Tensor] = []  # per-step losses not yet copied to the host
    unet.train()
    for step in range(start, config.steps):
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # this step's draws depend on (seed, step) only
        idx = torch.randint(0, n, (min(config.batch_size, n),), generator=gen)
        t = torch.randint(0, config.train_timesteps, (len(idx),), generator=gen)
        noise = torch.randn((len(idx), c, size, size), generator=gen).to(device)
        x0, t = x_all[idx.to(device)], t.to(device)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        pending.append(loss.detach())
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            chunk = torch.stack(pending).cpu().tolist()  # host sync, once per checkpoint
            losses.extend(chunk)
            pending = []
            if path:
                _save_atomic(path, {"format": CHECKPOINT_FORMAT, "unet": unet.state_dict(), "optimizer": opt.state_dict(),
                                    "step": done, "losses": losses, "config": asdict(config), "data": data})
            if log is not None:
                log(done, sum(chunk) / len(chunk))
    unet.eval()
    return unet, losses


@torch.no_grad()
def sample(unet, config: PriorConfig, n: int, seed: int = 0) -> torch.Tensor:
    """n unguided samples, uint8 (n, C, H, W), by the deterministic DDIM chain of config.sample_steps;
    image i from seed + i (ddim.initial_noise: an image does not depend on n)."""
    den = as_denoiser(unet, config)
    x_T = initial_noise(range(seed, seed + n), den.shape, device_of(unet))
    return diffusion_to_uint8(ddim_sample(den, x_T, config.sample_steps))


def load_generator(path_or_id: str, device: torch.device | str = "cpu") -> Denoiser:
    """A pixel-space diffusers pipeline (saved with save_pretrained, e.g. DDPMPipeline) as a Denoiser.

    Its scheduler is rebuilt as a DDIMScheduler from its config (same ᾱ, deterministic steps).
    A hub id works where the hub is reachable. Latent pipelines (with a VAE) are refused: guidance
    here runs in pixel space.
    """
    from diffusers import DDIMScheduler, DiffusionPipeline

    looks_local = os.path.isabs(path_or_id) or path_or_id.startswith((".", "~")) or path_or_id.count("/") > 1  # a hub id is owner/name
    if looks_local and not os.path.isdir(os.path.expanduser(path_or_id)):
        raise FileNotFoundError(f"no pipeline folder at {path_or_id}: give the folder save_pretrained wrote, or a hub id")
    pipe = DiffusionPipeline.from_pretrained(os.path.expanduser(path_or_id) if looks_local else path_or_id)
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(pipe, "vae", None) is not None:
        raise ValueError(f"{path_or_id} is a {type(pipe).__name__}: only pixel-space pipelines with a unet (e.g. DDPMPipeline) "
                         "can be guided here")
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{path_or_id}: prediction_type {scheduler.config.prediction_type!r} is not one of {PREDICTION_TYPES}")
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return Denoiser(unet.to(device).eval(), scheduler, (unet.config.in_channels, h, w))


def save_generator(unet, config: PriorConfig, path: str) -> None:
    """Save a trained prior as a diffusers DDPMPipeline (with its DDIM scheduler), loadable by load_generator."""
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet, scheduler=make_scheduler(config)).save_pretrained(path)
