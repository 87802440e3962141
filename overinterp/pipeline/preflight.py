"""The checks that touch the world, run once before any work, in the order a user wants to hear them:

1. names: the models (and the pretrained one) exist;
2. inputs: the data set's root, --train/--val (readable, one format; Parquet's footers are checked
   when the source is counted), a --weights file and a --generator folder exist;
3. outputs: --out can be written, and an http(s) tracking server answers;
4. --out itself: no live run holds it, its stored shards read, and it records the same settings.

Each failure is one ConfigError (or LockHeld / StoreError) naming the fix. Nothing is written: a dry
run and the budget guard run after these checks and leave --out untouched. The settings are recorded
(`record_settings`) only once the run holds the --out lock.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from overinterp import fs
from overinterp.config import DATASET_CLASSES, IN_MEMORY_ONLY, ConfigError, RunConfig

TRACKING_TIMEOUT_S = 5.0


def preflight(config: RunConfig) -> RunConfig:
    """Check everything a run needs from the world; returns the resolved config, with --train/--val
    found under --data-root for ImageFolder and Parquet sources."""
    cfg = config.resolved()
    check_names(cfg)
    cfg = check_inputs(cfg)
    check_outputs(cfg.out_dir, cfg.tracking_uri)
    check_out_dir(cfg)
    return cfg


def check_names(cfg: RunConfig) -> None:
    from overinterp.models import ModelError, check_model_name

    try:
        for m in dict.fromkeys((*cfg.models, *([cfg.pretrained] if cfg.pretrained else []))):
            check_model_name(m)
    except ModelError as e:
        raise ConfigError(str(e)) from e


def _split_path(root: str, split: str) -> Optional[str]:
    """<root>/<split>.parquet, <root>/<split> (a folder), or None; val also as test."""
    for name in (split, "test") if split == "val" else (split,):
        for candidate in (fs.join(root, f"{name}.parquet"), fs.join(root, name)):
            if fs.exists(candidate):
                return candidate
    return None


def check_inputs(cfg: RunConfig) -> RunConfig:
    """The source exists (and, for a streamable data set named by --data-root, its splits are
    found); a --weights file exists. Returns cfg with --train/--val filled in where they were found."""
    from overinterp.data import DataError, check_dataset_args

    if cfg.train is None and cfg.dataset in IN_MEMORY_ONLY + ("imagefolder",):
        try:
            check_dataset_args(cfg.dataset, cfg.data_root, cfg.download)
        except DataError as e:
            raise ConfigError(str(e)) from e
    if cfg.train is None and cfg.dataset not in IN_MEMORY_ONLY:
        if cfg.data_root is None:
            raise ConfigError(f"data set {cfg.dataset!r} needs --data-root DIR (with train and val inside), or --train and --val")
        found = {s: _split_path(cfg.data_root, s) for s in ("train", "val")}
        missing = [s for s, p in found.items() if p is None]
        if missing:
            raise ConfigError(f"--data-root {cfg.data_root} has no {' or '.join(missing)} split: expected {cfg.data_root}/train/<class>/<image> "
                              f"and {cfg.data_root}/val/<class>/<image>, or train.parquet and val.parquet")
        cfg = dataclasses.replace(cfg, train=found["train"], val=found["val"])
    for flag, path in (("--train", cfg.train), ("--val", cfg.val)):
        try:
            found = path is None or fs.exists(path)
        except OSError as e:  # an unreachable bucket or host; pyarrow's errors derive from OSError
            raise ConfigError(f"{flag} {path} cannot be reached ({str(e).strip().splitlines()[0]}): check the URI, the network "
                              "and this machine's credentials") from e
        if not found:
            raise ConfigError(f"{flag} {path} does not exist: give an ImageFolder split (<path>/<class>/<image>) or Parquet of encoded images")
    if cfg.train is not None and cfg.dataset in ("imagefolder", "parquet"):
        from overinterp.pipeline.images import is_parquet

        parquet = is_parquet(cfg.train)
        if parquet != is_parquet(cfg.val):
            kinds = ("Parquet", "an ImageFolder split") if parquet else ("an ImageFolder split", "Parquet")
            raise ConfigError(f"--train {cfg.train} is {kinds[0]} but --val {cfg.val} is {kinds[1]}: give both splits in one format")
        if cfg.dataset == "imagefolder" and parquet:  # a folder of Parquet files (its checks refuse --no-stream)
            cfg = dataclasses.replace(cfg, dataset="parquet")
        elif cfg.dataset == "parquet" and not parquet:
            raise ConfigError(f"--dataset parquet: {cfg.train} holds no .parquet file: for ImageFolder splits "
                              "(<split>/<class>/<image>) give --dataset imagefolder")
    if cfg.num_classes is not None and cfg.dataset != "parquet":  # it would be ignored: refused unless it says what is there
        from overinterp.pipeline.images import list_classes

        folders = cfg.dataset == "imagefolder" and cfg.train is not None
        have = len(list_classes(cfg.train)) if folders else DATASET_CLASSES[cfg.dataset]
        if cfg.num_classes != have:
            raise ConfigError(f"--num-classes {cfg.num_classes}, but {cfg.train if folders else cfg.dataset} has {have} classes"
                              + (" (its class folders)" if folders else "") + ": drop --num-classes (it sets a Parquet source's classes)")
    g = cfg.generator
    if g and g.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(g)):
        raise ConfigError(f"--generator {g} is not a folder: give a diffusers pipeline folder (save_pretrained) or a hub id")
    w = cfg.weights
    if w and not fs.is_uri(w) and ("/" in w or w.endswith((".pt", ".pth"))) and not os.path.isfile(w):
        raise ConfigError(f"--weights {w} is not a file: give a state_dict file or a torchvision weights name (DEFAULT)")
    return cfg


def check_outputs(out_dir: str, tracking_uri: Optional[str]) -> None:
    """--out can be written, and the tracking server answers: in one line each."""
    try:
        fs.check_output_dir(out_dir)
    except fs.OutputError as e:
        raise ConfigError(str(e)) from e
    check_tracking_server(tracking_uri)


def check_tracking_server(uri: Optional[str], timeout: float = TRACKING_TIMEOUT_S) -> None:
    """An http(s) MLflow server must answer /health within `timeout` seconds (MLflow itself would
    retry for minutes before saying anything). Other stores are checked when opened."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read(64)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"the MLflow tracking server {uri} does not answer within {timeout:g} s ({reason}): start it "
                          "(`mlflow server`), open its tunnel (`ray attach cluster.yaml -p 5000`), or pass another --tracking-uri") from e


def check_out_dir(cfg: RunConfig) -> None:
    """No live run holds --out, its shards read, and it records these settings (reads only)."""
    from overinterp import store
    from overinterp.pipeline.lock import OutputLock

    OutputLock(cfg.out_dir).check_free()
    store.validate_shards(fs.join(cfg.out_dir, "selections"))
    refuse_other_settings(cfg)


def _settings_path(cfg: RunConfig) -> str:
    return fs.join(cfg.out_dir, "config.json")


def _stored_form(cfg: RunConfig) -> dict:
    return json.loads(json.dumps(cfg.fingerprint()))  # tuples -> lists, as stored


def refuse_other_settings(cfg: RunConfig) -> bool:
    """ConfigError if --out's config.json records other settings; True when it records these,
    False when there is none. Reads only: safe before a dry run or the budget guard."""
    path = _settings_path(cfg)
    if not fs.exists(path):
        return False
    fp, old = _stored_form(cfg), fs.read_json(path)
    diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
    if diff:
        raise ConfigError(f"{cfg.out_dir} holds a run with other settings ({', '.join(diff)}): "
                          "use a new --out directory, or the same settings to resume it")
    return True


def record_settings(cfg: RunConfig) -> None:
    """Under the --out lock: refuse other settings, record these where none are recorded yet."""
    if not refuse_other_settings(cfg):
        fs.write_json(_settings_path(cfg), _stored_form(cfg))
