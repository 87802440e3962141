"""The explain stage of a run (`--explain vce,disagree`): guided generation under a diffusion prior
asks what the run's models have learned to look for (overinterp/explain/study.py).

One Ray task on the selection actors' kind of device (a GPU where the cluster has them) trains or
resumes the prior (`--generator` loads a diffusers pipeline instead), loads the run's models from
their trial checkpoints, and answers:

- vce: what change turns each of the first --explain-images test images into each other class, for
  the explained model and for the model trained on its 5% subsets (transfer measured on each one's
  second-seed twin);
- disagree: where the full-image model and the model trained on its primary-selector subsets,
  the plain model and its input-dropout twin, and the first two seeds disagree most.

Everything it makes lands under <out>/explain/: prior/prior.pt (resumable), one Parquet file per
question (EXPLAIN_SCHEMA: PNG-encoded images, targets, probabilities, seeds), and answers.json,
which a rerun with the same settings and checkpoints reuses. The driver adds the galleries, the
tables in summary.md and the MLflow metrics.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from overinterp import fs
from overinterp.pipeline.plan import Plan, SelectionSource
from overinterp.pipeline.trial import TrialSpec, checkpoint_path, pick_device

EXPLAIN_FORMAT = "2"
# one row per generated image; subject: the model a VCE explains, or the pair a disagreement image
# compares; images PNG-encoded (the store's packed form), probabilities float64, the objective of the
# unguided start and of the guided image (the loss guidance minimised)
EXPLAIN_SCHEMA = pa.schema([
    ("question", pa.string()), ("subject", pa.string()), ("direction", pa.string()), ("method", pa.string()),
    ("image", pa.binary()), ("start_image", pa.binary()), ("target", pa.int64()), ("seed", pa.int64()),
    ("p_first", pa.float64()), ("p_second", pa.float64()), ("success", pa.bool_()), ("l2", pa.float64()),
    ("image_index", pa.int64()), ("label", pa.int64()), ("objective_start", pa.float64()), ("objective_end", pa.float64()),
], metadata={"overinterp.explain_format": EXPLAIN_FORMAT})


@dataclass(frozen=True)
class ExplainSettings:
    """What the stage does, from the run's config: questions, guidance, prior, images per question."""

    questions: tuple[str, ...]
    method: str
    images: int  # test images explained by VCEs; generated images per pair and direction
    prior_steps: int
    generator: Optional[str]
    guidance_steps: int = 10
    iterations: int = 50
    seed: int = 0

    @classmethod
    def of(cls, cfg) -> "ExplainSettings":
        return cls(tuple(cfg.explain), cfg.explain_method, cfg.explain_images, cfg.prior_steps, cfg.generator)


@dataclass(frozen=True)
class ModelRef:
    """A model the stage loads: its label in tables and galleries, and where it comes from."""

    label: str
    source: SelectionSource


def _ckpt(label: str, out_dir: str, spec: TrialSpec) -> ModelRef:
    return ModelRef(label, SelectionSource(spec.name, (checkpoint_path(out_dir, spec),)))


@dataclass(frozen=True)
class ExplainModels:
    """The models the stage questions.

    vce: {label: (model, its second-seed twin or None)} — the models whose counterfactuals are made
        (the explained model, and the model trained on its primary-selector subsets), each with the
        independently trained model its VCEs' transfer is measured on;
    pairs: {pair name: (A, B)} — the models compared by disagreement.
    """

    vce: dict
    pairs: dict

    def refs(self) -> list[ModelRef]:
        out = [r for m, twin in self.vce.values() for r in (m, twin) if r is not None]
        return out + [r for p in self.pairs.values() for r in p]


def explain_models(plan: Plan) -> ExplainModels:
    """The models of the first architecture the stage questions (ExplainModels), each where the
    plan trains it. Pairs: full-image vs the model trained on its primary-selector subsets (mean
    fill, same seed); plain vs input dropout; seed s0 vs seed s1."""
    m, s0 = plan.models[0], plan.seeds[0]
    s1 = plan.seeds[1] if len(plan.seeds) > 1 else None
    explained_source = next(iter(plan.sources[m].values()))  # plain (first seed) or pretrained
    explained = ModelRef("pretrained" if explained_source.variant == "pretrained" else f"full s{s0}", explained_source)
    twin = _ckpt(f"full s{s1}", plan.out_dir, TrialSpec(m, s1)) if TrialSpec(m, s1) in plan.full_trials else None
    vce = {explained.label: (explained, twin)}
    pairs: dict[str, tuple[ModelRef, ModelRef]] = {}
    key = f"{explained_source.tag}/{plan.primary}"
    subset = TrialSpec(m, s0, key, "mean")
    if subset in plan.subset_trials:
        on_subsets = _ckpt(f"{subset.condition} s{s0}", plan.out_dir, subset)
        subset_twin = TrialSpec(m, s1, key, "mean")
        vce[on_subsets.label] = (on_subsets, _ckpt(f"{subset.condition} s{s1}", plan.out_dir, subset_twin)
                                 if subset_twin in plan.subset_trials else None)
        pairs[f"full vs {subset.condition}"] = (explained, on_subsets)
    dropout = next((t for t in plan.full_trials if t.model == m and t.seed == s0 and t.input_dropout), None)
    if dropout is not None:
        pairs["plain vs input dropout"] = (explained, _ckpt(f"dropout s{s0}", plan.out_dir, dropout))
    if twin is not None:
        pairs[f"seed {s0} vs seed {s1}"] = (explained, twin)
    return ExplainModels(vce, pairs)


def _png(image: np.ndarray) -> bytes:
    """(C, H, W) uint8 -> PNG bytes."""
    from PIL import Image

    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def answer_table(question: str, subject: str, rows: dict) -> pa.Table:
    """One Answer's rows as an EXPLAIN_SCHEMA table (columns a question lacks are null)."""
    n = len(rows["target"])
    cols = {"question": [question] * n, "subject": [subject] * n, "direction": rows.get("direction"), "method": rows["method"],
            "image": [_png(i) for i in rows["image"]], "start_image": [_png(i) for i in rows["start_image"]],
            "target": rows["target"], "seed": rows["seed"], "p_first": rows.get("p_first", rows.get("p_target")),
            "p_second": rows.get("p_second"), "success": rows.get("success"), "l2": rows.get("l2"),
            "image_index": rows.get("image_index"), "label": rows.get("label"),
            "objective_start": rows["objective_start"], "objective_end": rows["objective_end"]}
    return pa.table({k: pa.array([None] * n if v is None else list(v), type=EXPLAIN_SCHEMA.field(k).type) for k, v in cols.items()},
                    schema=EXPLAIN_SCHEMA)


def read_answers(out_dir: str, name: str) -> pa.Table:
    """An answer's Parquet file, checked against EXPLAIN_SCHEMA."""
    table = pq.read_table(io.BytesIO(fs.read_bytes(fs.join(out_dir, "explain", name))))
    if table.schema.metadata.get(b"overinterp.explain_format") != EXPLAIN_FORMAT.encode():
        raise ValueError(f"{name} in {out_dir}/explain was written by another format of the explain stage: delete explain/ and rerun")
    return table


def fingerprint(settings: ExplainSettings, refs: list[ModelRef], test_ids: np.ndarray) -> str:
    """The settings, the file format, the checkpoints' bytes and the test images' ids: equal means the
    answers still hold."""
    h = hashlib.sha256(json.dumps({**asdict(settings), "format": EXPLAIN_FORMAT}, sort_keys=True).encode())  # a new format reruns
    for ref in refs:
        h.update(ref.source.tag.encode())
        for path in ref.source.checkpoints:
            h.update(hashlib.sha256(fs.read_bytes(path)).digest())
    h.update(np.ascontiguousarray(test_ids).tobytes())
    return h.hexdigest()


def _prior(settings: ExplainSettings, out_dir: str, images: Optional[np.ndarray], mean, std, device):
    """(denoiser, prior record for MLflow: losses and samples, or the generator's name)."""
    from overinterp.explain.prior import CHECKPOINT_NAME, PriorConfig, as_denoiser, load_generator, sample, train_prior

    if settings.generator:
        return load_generator(settings.generator, device), {"generator": settings.generator}
    config = PriorConfig(steps=settings.prior_steps, seed=settings.seed)
    remote = fs.join(out_dir, "explain", "prior", CHECKPOINT_NAME)
    with tempfile.TemporaryDirectory(prefix="overinterp-prior-") as local:
        if fs.is_uri(out_dir):  # train_prior checkpoints to a local folder: mirror it to the URI
            if fs.exists(remote):
                with open(os.path.join(local, CHECKPOINT_NAME), "wb") as f:
                    f.write(fs.read_bytes(remote))
            folder = local
        else:
            folder = os.path.dirname(remote)
        unet, losses = train_prior(images, mean, std, config, folder, device=device)
        if fs.is_uri(out_dir):
            with open(os.path.join(local, CHECKPOINT_NAME), "rb") as f:
                fs.write_bytes(remote, f.read())
    every = config.checkpoint_every
    curve = [(min(s + every, len(losses)), float(np.mean(losses[s:s + every]))) for s in range(0, len(losses), every)]
    return as_denoiser(unet, config), {"steps": len(losses), "loss_curve": curve, "samples": sample(unet, config, 16).cpu().numpy()}


def answer_questions(settings: ExplainSettings, out_dir: str, models: ExplainModels, test, prior_images: Optional[np.ndarray],
                     num_classes: int, threads: int = 1) -> dict:
    """The stage's work (a Ray task, or called directly): prior, generation, Parquet.

    Returns {"section": what summary.json keeps under "explain", "prior": the prior's record for
    MLflow, "galleries": [(kind "vce" or "disagree", label or pair name, rows)] in file order}."""
    import torch

    from overinterp.explain.guided import GuidanceConfig
    from overinterp.explain.study import disagreement_answer, disagreement_request, generate_requests, vce_answer, vce_request

    torch.set_num_threads(max(1, threads))
    device = pick_device()
    den, prior = _prior(settings, out_dir, prior_images, test.mean, test.std, device)
    guidance = GuidanceConfig(method=settings.method, steps=settings.guidance_steps, iterations=settings.iterations)
    loaded = {}

    def model(ref: Optional[ModelRef]):
        if ref is not None and ref.source.tag not in loaded:
            loaded[ref.source.tag] = ref.source.load(device)
        return None if ref is None else loaded[ref.source.tag]

    images = torch.from_numpy(test.images)
    labels = torch.from_numpy(test.labels)
    n = min(settings.images, len(images))
    questions = []  # (kind, label, request, answer): one guided chain for all (study.generate_requests)
    if "vce" in settings.questions:
        for label, (m, twin) in models.vce.items():
            questions.append(("vce", label, vce_request(den, model(m), images[:n], test.mean, test.std, guidance)[0],
                              lambda res, m=m, twin=twin: vce_answer(res, model(m), images[:n], labels[:n], test.mean, test.std, model(twin))))
    if "disagree" in settings.questions:
        seeds = list(range(settings.seed, settings.seed + settings.images))
        for name, (a, b) in models.pairs.items():
            questions.append(("disagree", name, disagreement_request(den, model(a), model(b), seeds, num_classes),
                              lambda res, a=a, b=b: disagreement_answer(res, {a.label: model(a), b.label: model(b)}, images,
                                                                        test.mean, test.std)))
    section = {"settings": asdict(settings), "vce": {}, "disagree": {}}
    galleries = []
    results = generate_requests(den, [q[2] for q in questions], test.mean, test.std, guidance)
    for (kind, label, _, answer), res in zip(questions, results):
        ans = answer(res)
        file = f"{kind}-{len(section[kind])}.parquet"
        _write(out_dir, file, answer_table(kind, label, ans.rows))
        if kind == "vce":
            twin = models.vce[label][1]
            section["vce"][label] = {**ans.measures, "transfer_to": twin.label if twin else None, "file": file}
        else:
            a, b = models.pairs[label]
            section["disagree"][label] = {"file": file, "models": [a.label, b.label], "directions": ans.measures}
        galleries.append((kind, label, ans.rows))
    return {"section": section, "prior": prior, "galleries": galleries}


def _write(out_dir: str, name: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.write_bytes(fs.join(out_dir, "explain", name), buf.getvalue())  # atomic, local or URI


def run_explain(cfg, plan: Plan, test, prior_images: Optional[np.ndarray], resources) -> dict:
    """The stage from the driver: reuse <out>/explain/answers.json where the settings, checkpoints
    and test images are unchanged, else run answer_questions as one Ray task on the selection
    device and record it. Returns answer_questions' dict (galleries rebuilt from the Parquet files
    on reuse; the prior's record is then {})."""
    import ray

    settings = ExplainSettings.of(cfg)
    models = explain_models(plan)
    digest = fingerprint(settings, models.refs(), test.image_id)
    record = fs.join(cfg.out_dir, "explain", "answers.json")
    if fs.exists(record):
        saved = fs.read_json(record)
        if saved.get("fingerprint") == digest:
            return {"section": saved["section"], "prior": {}, "galleries": galleries_from_store(cfg.out_dir, saved["section"])}
    gpus = resources.gpus_per_worker if resources.use_gpu else 0
    cpus = max(1.0, resources.cpus_per_worker)
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=1)(answer_questions)
    threads = int(cpus) if gpus else max(1, int(resources.max_cpus or cpus))  # the rest of the cluster idles in this stage
    out = ray.get(task.remote(settings, cfg.out_dir, models, test, prior_images, plan.num_classes, threads))
    fs.write_json(record, {"fingerprint": digest, "section": out["section"]})  # last: its presence means the stage finished
    return out


def galleries_from_store(out_dir: str, section: dict) -> list:
    """answer_questions' galleries read back from the Parquet files (a rerun that reuses the answers)."""
    from PIL import Image

    def decode(blobs) -> np.ndarray:
        arrs = [np.asarray(Image.open(io.BytesIO(b))) for b in blobs]
        return np.stack([a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrs])

    out = []
    for kind in ("vce", "disagree"):
        for label, entry in section.get(kind, {}).items():
            t = read_answers(out_dir, entry["file"]).to_pydict()
            rows = {k: np.asarray(v) for k, v in t.items() if k not in ("image", "start_image")}
            rows.update(image=decode(t["image"]), start_image=decode(t["start_image"]), p_target=np.asarray(t["p_first"], dtype=float))
            out.append((kind, label, rows))
    return out


def _hwc(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 2, 3, 1)


def gallery_files(galleries: list, classes, local_dir: str) -> list[str]:
    """explain_vce_<i>.png per explained model (each test image, then its VCE towards each class; the
    image itself in its own predicted class's column) and explain_disagree_<i>.png per pair (the
    unguided sample of each seed, then the image guided each way); returns the local paths."""
    from overinterp.report import gallery_figure, save_figure

    paths, count = [], {"vce": 0, "disagree": 0}
    for kind, label, r in galleries:
        name = os.path.join(local_dir, f"explain_{kind}_{count[kind]}.png")
        count[kind] += 1
        if kind == "vce":
            t = int(np.sum(r["image_index"] == 0))
            starts, images, targets = r["start_image"][::t], r["image"], r["target"].reshape(-1, t)
            if len(classes) - 1 == t:  # one column per class
                panels = {}
                for c in range(len(classes)):
                    cell = starts.copy()
                    for i in range(len(starts)):
                        j = np.flatnonzero(targets[i] == c)
                        if len(j):
                            cell[i] = images[i * t + j[0]]
                    panels[f"→ {classes[c]}" + (f" ({label})" if c == 0 else "")] = _hwc(cell)
            else:  # many classes: the most probable other classes, by rank
                panels = {f"target {j + 1}" + (f" ({label})" if j == 0 else ""): _hwc(images[j::t]) for j in range(t)}
            titles = [f"{classes[int(lbl)]}" for lbl in r["label"][::t]]
            paths.append(save_figure(gallery_figure(_hwc(starts), panels, titles, first_title="test image"), name))
        else:
            directions = list(dict.fromkeys(r["direction"]))
            first = r["direction"] == directions[0]
            panels = {f"{d} ({label})" if k == 0 else d: _hwc(r["image"][r["direction"] == d]) for k, d in enumerate(directions)}
            titles = [f"class {classes[int(c)]}" for c in r["target"][first]]
            paths.append(save_figure(gallery_figure(_hwc(r["start_image"][first]), panels, titles, first_title="unguided"), name))
    return paths


def tile(samples: np.ndarray, columns: int = 4) -> np.ndarray:
    """(N, C, H, W) uint8 -> one (rows·H, columns·W, C) image, for MLflow's log_image."""
    n, c, h, w = samples.shape
    rows = -(-n // columns)
    cells = np.concatenate([samples, np.zeros((rows * columns - n, c, h, w), np.uint8)])  # blank cells after the last sample
    return cells.reshape(rows, columns, c, h, w).transpose(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)
