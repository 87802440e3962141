"""Training on pixel-subsets of data sets too big to hold: Ray Tune trials on Ray Data streams.

A trial's data never sits whole anywhere: the *encoded* images of a split are joined by image_id
with their keep-masks read from the Parquet store (by lookup in the object store, or Ray Data's
disk-backed hash join), decoded on the Ray Data workers, and streamed to the trainer. Each batch's
mask is applied on the trainer's device, before augmentation, so the mask moves with the image.

A trial of one worker trains in its own Tune process, which holds the worker's CPUs and GPU: it
iterates its streams itself (`Dataset.iter_torch_batches`, as Ray Train's local mode does) and
starts no Ray Train actors (controller, worker, dataset manager, placement-group cleaner,
synchronisation: ~15 CPU-seconds of process start-up a trial on the 2-core machine of
BENCHMARKS.md). A trial of several workers (--workers-per-trial) runs a Ray Train `TorchTrainer`
(DDP: gloo on CPUs, NCCL on GPUs) whose workers stream their shares through
`get_dataset_shard(...).iter_torch_batches`; evaluation on the validation split is summed across them.

After every epoch the trainer writes its state (model, optimiser, schedule, epoch) to the out URI. A
one-worker trial writes it to trials/<name>/state.pt and reports the epoch to Tune itself; a trial
whose process died goes on from it when Tune retries the trial, or on the rerun. In a DDP trial
rank 0 writes it as a Train checkpoint and every worker reports; a worker lost mid-trial (a node
taken back, a crash) restarts the worker group from the last checkpoint (Train's FailureConfig),
and a trial whose whole Tune process died resumes the same way on the rerun (same run name and
storage path). Each epoch re-reads and re-joins the encoded images: the price of never holding them.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import asdict
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import torch
from ray.train import DataConfig

from overinterp import fs, store
from overinterp.pipeline.images import MASK_COLUMN, decode_batch, drop_bad, keep_all, look_up_keep, read_encoded, read_parquet
from overinterp.pipeline.resources import exit_with_parent, worker_device
from overinterp.pipeline.trial import TrialSpec, save_result, trial_dir
from overinterp.selection import keep_mask, random_order


def _keep_bits(batch: pa.Table, hw: int, fraction: float, split: str) -> dict:
    """Store rows -> {image_id, keep}: the last ceil(fraction * HW) pixels of each order, packed."""
    ids = batch.column("image_id").to_numpy()
    steps_col = batch.column("removal_step")
    if steps_col.null_count == len(ids):  # the random baseline: regenerated from (seed, split, id)
        keep = keep_mask(random_order(ids, hw, int(store.stored_params(batch)["seed"]), split), fraction).numpy()  # the in-memory rule
    else:
        steps = steps_col.combine_chunks().flatten().to_numpy().reshape(len(ids), hw)
        keep = store.steps_to_keep(steps, fraction)
    return {"image_id": ids, MASK_COLUMN: np.packbits(keep, axis=1)}


def _selection_shards(root: str, subset: str, split: str):
    model_tag, sel_tag = subset.split("/")
    fsys, paths = store.shard_files(root, model_tag, sel_tag, split)
    if not paths:
        raise store.StoreError(f"no selections stored for {subset} {split} under {root}: rerun the selection stage")
    return fsys, paths


def _repeated(root: str, subset: str, split: str) -> store.StoreError:
    return store.StoreError(f"{root}/{subset}/{split} holds repeated image ids: run `overinterp store repair --out {root.removesuffix('/selections')}`")


def mask_rows(root: str, subset: str, split: str, hw: int, fraction: float) -> ray.data.Dataset:
    """{image_id, keep} for every stored row of one selection; refuses repeated ids (run `store repair`)."""
    fsys, paths = _selection_shards(root, subset, split)
    ids = np.concatenate([store.read_shard(fsys, p, ["image_id"]).column("image_id").to_numpy() for p in paths])
    if len(np.unique(ids)) != len(ids):
        raise _repeated(root, subset, split)
    ds = read_parquet(paths, len(ids), filesystem=fsys, columns=["image_id", "removal_step", "selector_params"])
    return ds.map_batches(_keep_bits, fn_kwargs={"hw": hw, "fraction": fraction, "split": split}, batch_format="pyarrow")


def mask_table(root: str, subset: str, split: str, hw: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """One selection's keep-masks as arrays: ids (N,) int64 sorted, packed keep (N, ceil(HW / 8)) uint8.

    Read shard by shard (one shard's removal steps at a time); refuses repeated ids (run `store repair`).
    """
    fsys, paths = _selection_shards(root, subset, split)
    rows = [_keep_bits(store.read_shard(fsys, p, ["image_id", "removal_step", "selector_params"]), hw, fraction, split) for p in paths]
    ids = np.concatenate([r["image_id"] for r in rows])
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if not len(ids):
        raise store.StoreError(f"the selections stored for {subset} {split} under {root} hold no image: rerun the selection stage")
    if (ids[1:] == ids[:-1]).any():
        raise _repeated(root, subset, split)
    return ids, np.concatenate([r[MASK_COLUMN] for r in rows])[order]


# A selection's keep-masks are joined to the encoded images in one of two ways, by their size
# (images × ceil(HW / 8) bytes): up to this many bytes they are put in the object store once and
# looked up by id on the decoding workers (no shuffle: a few seconds per pass); bigger (ImageNet at
# full resolution: 1.28M × 6,272 B = 8 GB) they are hash-joined by Ray Data, disk-backed, whose
# shuffle actors cost ~15 s per pass to start.
BROADCAST_MASK_BYTES = 1 << 30


IMAGES_PER_PARTITION = 5000  # join partitions: ~5,000 encoded ImageNet images (~0.5 GB) each
# Training images are shuffled in two steps, since a source is stored in order (an ImageFolder class
# by class): its files are read in a seeded random order, another each epoch (read_encoded), then each
# worker draws its batches at random from a buffer of this many images (SGD and BatchNorm on one-class
# batches learn nothing). Rows within one Parquet file keep their order up to the buffer.
SHUFFLE_BUFFER_IMAGES = 2048


def broadcast_join(n_images: int, hw: int) -> bool:
    """Whether a split's keep-masks are joined by lookup (see BROADCAST_MASK_BYTES)."""
    return n_images * -(-hw // 8) <= BROADCAST_MASK_BYTES


def _counted_mask_table(root: str, subset: str, split: str, hw: int, fraction: float) -> tuple[int, tuple]:
    table = mask_table(root, subset, split, hw, fraction)
    return len(table[0]), table


# A selection's keep-masks table of up to this many bytes (images × (8 + ceil(HW / 8))) is read in the
# driver and put in the object store from there: a Ray task costs a fresh worker's imports (~4 s on 2
# cores), and a table this small does not grow the driver's heap measurably. Bigger tables are built
# by tasks: every shard of an ImageNet-count split read and its ids sorted would grow the driver's
# heap by the split's size (glibc keeps what it grew).
DRIVER_MASK_TABLE_BYTES = 4 << 20


def mask_table_refs(root: str, keys: list[tuple[str, str]], hw: int, fraction: float, n_images: dict) -> dict[tuple[str, str], list]:
    """{(subset, split): [ObjectRef of mask_table(...)]}: each put in the object store once, for every
    trial and worker that looks up that selection's keep-masks (a list, so that Ray passes the
    reference, not the arrays). n_images: {split: images} (at most, the plan's count).

    Small tables are read in the driver; bigger ones by Ray tasks, all at once as the cluster's CPUs
    allow, whose row counts alone the driver waits for (DRIVER_MASK_TABLE_BYTES). A store error (no
    shards, repeated ids) is raised here, once, either way."""
    build = ray.remote(num_cpus=1, num_returns=2, max_retries=2)(_counted_mask_table)
    tasks, out = {}, {}
    for subset, split in keys:
        if n_images[split] * (8 + -(-hw // 8)) <= DRIVER_MASK_TABLE_BYTES:
            out[subset, split] = [ray.put(mask_table(root, subset, split, hw, fraction))]
        else:
            tasks[subset, split] = build.remote(root, subset, split, hw, fraction)
    ray.get([count for count, _ in tasks.values()])
    return {**out, **{key: [table] for key, (_, table) in tasks.items()}}


def subset_stream(source: str, classes: Optional[list[str]], limit: Optional[int], size: int, root: str, subset: Optional[str],
                  split: str, fraction: float, n_images: int, table: Optional[list] = None,
                  shuffle_seed: Optional[int] = None) -> ray.data.Dataset:
    """The images of one split that have a stored selection, decoded, each with its packed keep-mask;
    subset None: every image of the split, with every pixel kept (full-image trials).
    table: mask_table_refs' entry for this selection and split, where the caller holds it already.
    shuffle_seed: a training stream's: its files in another order each epoch, drawn from the seed
    (read_encoded), and its rows handed on in that order (decoding tasks finish in any order), so a
    one-worker trial trains alike run after run (Ray Train sets its own order options on the
    datasets it splits between workers)."""
    encoded = read_encoded(source, classes, limit, n_images, shuffle_seed)
    hw = size * size
    if subset is None:
        joined = encoded.map_batches(keep_all, fn_kwargs={"hw": hw}, batch_format="numpy", batch_size=64)
    elif broadcast_join(n_images, hw):
        table = table or mask_table_refs(root, [(subset, split)], hw, fraction, {split: n_images})[subset, split]
        joined = encoded.map_batches(look_up_keep, fn_kwargs={"table": table}, batch_format="numpy", batch_size=256)
    else:
        partitions = min(512, max(1, n_images // IMAGES_PER_PARTITION))
        joined = encoded.join(mask_rows(root, subset, split, hw, fraction), join_type="inner", num_partitions=partitions, on=("image_id",))
    decoded = joined.map_batches(decode_batch, fn_kwargs={"size": size, "keep_columns": (MASK_COLUMN,)},
                                 batch_format="numpy", batch_size=64)
    # an image that decoded at selection time and not now (changed on disk) is dropped, not trained on as zeros
    stream = drop_bad(decoded).select_columns(["image_id", "label", "image", MASK_COLUMN])
    if shuffle_seed is not None:
        stream.context.execution_options.preserve_order = True
    return stream


def unpack_keep(packed: torch.Tensor, hw: int) -> torch.Tensor:
    """(B, ceil(HW / 8)) uint8 -> (B, HW) bool, on packed's device (np.packbits bit order: MSB first)."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed[:, :, None] >> shifts) & 1  # (B, nbytes, 8)
    return bits.reshape(packed.shape[0], -1)[:, :hw].bool()


def model_inputs(batch: dict, mean, std, hw: int, fill: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A streamed batch ({image (N, C, H, W) uint8, image_id (N,), MASK_COLUMN (N, ceil(HW/8))})
    as the model sees it: normalised, the pixels outside its keep-mask filled. ROAD's noise comes
    from `generator` in training (fresh each epoch, replayed after a restart) and from one seed per
    image id in evaluation, the in-memory rule (training.predict): an image's fill does not depend on
    its batch, and both backends fill it alike."""
    from overinterp.training import prepare

    keep = unpack_keep(batch[MASK_COLUMN], hw)
    if generator is not None:
        return prepare(batch["image"], mean, std, keep, fill, generator=generator)
    return prepare(batch["image"], mean, std, keep, fill, seeds=batch["image_id"].tolist())


def _load_state(path: str, device) -> dict:
    return torch.load(io.BytesIO(fs.read_bytes(path)), map_location=device, weights_only=True)


def train_loop(config: dict, streams: Optional[dict] = None) -> Optional[dict]:
    """One trial's training on streamed, masked batches; its state saved every epoch.

    streams: the trial's {"train", "val"} datasets where a one-worker trial runs the loop in its own
    process: the loop then keeps its epoch state in config["state_path"], reports each epoch to Tune
    and returns the last state it wrote (with every epoch's metrics, "history"). None on the workers
    of a TorchTrainer (DDP), which get their shares and checkpoints from Ray Train."""
    exit_with_parent()
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from overinterp.models import ModelSpec, build
    from overinterp.training import TrainConfig, augment_batch, black, sgd

    started = time.time()  # wall clock, as the driver's fit_at: the worker group's start-up is the difference
    torch.set_num_threads(int(config["threads"]))
    spec = TrialSpec(**config["trial"])
    tc = TrainConfig(**config["train"])
    mean, std, hw = tuple(config["mean"]), tuple(config["std"]), int(config["hw"])
    local_state = config["state_path"] if streams is not None else None
    if local_state:
        rank, world, device = 0, 1, worker_device()  # the trial's own GPU, else the CPU
        train_shard, val_shard = streams["train"], streams["val"]
    else:
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    torch.manual_seed(spec.seed)
    model_spec = ModelSpec(spec.model, int(config["num_classes"]), 3, spec.input_dropout)
    model = build(model_spec).to(device)
    opt, sched = sgd(model, tc)
    start, state, history = 0, None, []
    if local_state:
        if fs.exists(local_state):
            state = _load_state(local_state, device)
    else:
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                state = _load_state(os.path.join(d, "state.pt"), device)
    if state is not None:  # a restarted worker group, or a rerun of a trial that died: go on from the last epoch
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["epoch"]) + 1
        history = list(state.get("history", []))
        if local_state:
            # Ray Data draws each pass's file order from the seed and the count of passes run on the
            # dataset's context (read_encoded); counted from `start`, the resumed trial reads each
            # epoch's files in the order the uninterrupted trial read them
            train_shard.context._execution_idx = start
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    gen = torch.Generator().manual_seed(spec.seed * 1000 + rank)
    for epoch in range(start, tc.epochs):
        epoch_at, first_batch_at = time.time(), None
        ddp.train()
        gen.manual_seed(spec.seed * 1000 + rank + 7919 * epoch)  # augmentation replays identically after a restart
        loss_sum = torch.zeros(2, device=device)  # (summed loss, images)
        for batch in train_shard.iter_torch_batches(batch_size=tc.batch_size, device=device, drop_last=False,
                                                    local_shuffle_buffer_size=SHUFFLE_BUFFER_IMAGES,
                                                    local_shuffle_seed=spec.seed * 1000 + rank + 7919 * epoch):
            first_batch_at = first_batch_at or time.time()
            if len(batch["label"]) == 1:
                continue  # BatchNorm cannot train on one image (a split's last, short batch)
            x = model_inputs(batch, mean, std, hw, spec.fill, generator=gen)
            if tc.augment:
                x = augment_batch(x, gen, border=black(mean, std) if spec.subset is None else None)
            loss = F.cross_entropy(ddp(x), batch["label"].long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += torch.stack([loss.detach() * len(x), torch.tensor(float(len(x)), device=device)])
        sched.step()
        model.eval()
        if world > 1:  # every worker evaluates rank 0's BatchNorm statistics, those checkpointed below
            for b in model.buffers():
                dist.broadcast(b, src=0)
        counts = torch.zeros(2, device=device)  # (correct, images) on this worker's share of val
        with torch.no_grad():
            # the plain module, not ddp: DDP's forward broadcasts buffers (a collective), and val shares
            # may differ by a batch between workers (see _TrainEqualValWhole), which would hang it
            for batch in val_shard.iter_torch_batches(batch_size=tc.batch_size, device=device):
                x = model_inputs(batch, mean, std, hw, spec.fill)
                counts += torch.stack([(model(x).argmax(1) == batch["label"]).sum().float(), torch.tensor(float(len(x)), device=device)])
        if world > 1:
            dist.all_reduce(counts)
            dist.all_reduce(loss_sum)
        metrics = {"epoch": epoch, "train_loss": float(loss_sum[0] / loss_sum[1].clamp(min=1)),
                   "val_accuracy": float(counts[0] / counts[1].clamp(min=1)), "val_images": int(counts[1]),
                   "start_epoch": start,  # > 0: this worker group resumed from a checkpoint
                   # where a trial's fixed cost goes (s): the worker group's start, the data stream's first batch
                   "worker_start_s": started - config["fit_at"], "first_batch_s": (first_batch_at or time.time()) - epoch_at,
                   "epoch_s": time.time() - epoch_at}
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
                 "spec": asdict(model_spec)}
        if local_state:
            from ray import tune

            history.append({**metrics, "device": device.type})
            state["history"] = history
            buf = io.BytesIO()
            torch.save(state, buf)
            fs.write_bytes(local_state, buf.getvalue())  # whole or not at all (fs.write_bytes)
            if _in_tune_session():
                tune.report(metrics)  # the epoch's metrics reach the driver's MLflow logger live
            continue
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                torch.save(state, os.path.join(d, "state.pt"))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)
    return state if local_state else None


def _in_tune_session() -> bool:
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session as in_session

    return in_session()


class _TrainEqualValWhole(DataConfig):
    """Train's DataConfig, but val is split with equal=False.

    Train splits every dataset with `streaming_split(equal=True)`, which drops rows so that each
    worker gets as many: right for train (DDP steps in lockstep, so workers need equal batch counts),
    but it would leave up to world-1 val images out of the accuracy. Evaluation has no collective per
    batch, so val shares may differ by a few rows, and every image counts once.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = super().configure({k: v for k, v in datasets.items() if k != "val"}, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            if val.name is None:
                val.set_name("val")
            val.context.execution_options = self.default_ingest_options()
            for i, split in enumerate(val.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                output[i]["val"] = split
        return output


def run_stream_trial(spec: TrialSpec, streams: dict, train_config: dict, data_info: dict, out_dir: str, resources,
                     use_cuda: bool, workers: int = 1, max_failures: int = 3) -> dict:
    """One trial: a TorchTrainer over the trial's streams; writes trials/<name>/result.json and model.pt.

    streams: {"train": Dataset, "val": Dataset} from `subset_stream`.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from overinterp.models import ModelSpec, build

    t0 = time.time()
    local = workers == 1  # the loop runs here, in the trial's process
    config = {"trial": asdict(spec), "train": train_config, "threads": max(1, int(resources.cpus_per_trial)), "fit_at": time.time(),
              "state_path": fs.join(trial_dir(out_dir, spec), "state.pt"), **data_info}
    if local:
        state = train_loop(config, streams)  # the last epoch's, as written to state_path
    else:
        callbacks = []
        if _in_tune_session():
            from ray.tune.integration.ray_train import TuneReportCallback

            # Every epoch's metrics reach Tune live, as each ray.train.report happens (Train V2's bridge: the
            # trial's Tune session gets rank 0's metrics), so the driver's MLflow TrialLogger logs
            # train_loss and val_accuracy per epoch while the trainer runs; the trainable's final report
            # (stream.py) only adds the test accuracy.
            callbacks.append(TuneReportCallback())
        per_worker = {"CPU": resources.cpus_per_trial}
        if resources.use_gpu:
            per_worker["GPU"] = resources.gpus_per_trial
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=resources.use_gpu, resources_per_worker=per_worker),
            # NCCL needs CUDA; GPU nodes without it (a broken driver, or a simulated cluster) train with gloo
            torch_config=TorchConfig(backend="nccl" if use_cuda else "gloo"),
            datasets=streams,
            dataset_config=_TrainEqualValWhole(),
            run_config=RunConfig(name=spec.name, storage_path=fs.join(out_dir, "train-runs"), callbacks=callbacks,
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
    fit_s = time.time() - t0
    if local:
        final = state["history"][-1]
        history, device = pd.DataFrame(state["history"]), final["device"]  # where it trained: the caller's GPU, if it holds one
    else:
        device = "cuda" if use_cuda else "cpu"
        with result.checkpoint.as_directory() as d:
            state = _load_state(os.path.join(d, "state.pt"), "cpu")
        # one row per epoch reported; where Ray kept no frame, the last report is the only row
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame([result.metrics])
        final = result.metrics
    model_spec = ModelSpec(**state["spec"])
    model = build(model_spec)
    model.load_state_dict(state["model"])
    out = save_result(
        out_dir, spec, model_spec, model, t0, accuracy=final["val_accuracy"], train_loss=final["train_loss"],
        losses=[float(v) for v in history["train_loss"]], val_accuracies=[float(v) for v in history["val_accuracy"]],
        device=device, workers=workers, resumed_from_epochs=sorted({int(v) for v in history["start_epoch"] if v > 0}),
        val_images=final["val_images"],
        # seconds: the trainer's whole fit, its worker group's start, each epoch and its wait for the first batch
        timing={"fit_s": fit_s, "worker_start_s": float(history["worker_start_s"].iloc[0]),
                "epoch_s": [float(v) for v in history["epoch_s"]], "first_batch_s": [float(v) for v in history["first_batch_s"]]})
    if local:
        fs.delete(config["state_path"])  # the epoch state (optimiser included) is only for resuming; model.pt stays
    return out


def cuda_on_gpu_workers(gpus: float) -> bool:
    """Whether a task given GPUs finds CUDA there (False on GPU nodes without a working driver, and
    on simulated clusters whose GPUs are Ray resources only)."""
    @ray.remote(num_gpus=gpus, num_cpus=0)
    def probe() -> bool:
        return bool(ray.get_gpu_ids()) and torch.cuda.is_available()

    return ray.get(probe.remote())
