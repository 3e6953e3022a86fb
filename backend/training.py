"""Training a project's segmenter from its annotations; also a command-line tool.

    python -m backend.training --project 12                      # from annotations stored by the webhook
    python -m backend.training --project 12 --pull               # first pull them from Label Studio's API
    python -m backend.training --project 12 --export export.json --label-config config.xml

The backend runs the first two forms in a child process (``backend.jobs``); the third
trains from a Label Studio JSON export file. Each run writes a checkpoint atomically and
registers it as the project's next version; progress goes to ``<project dir>/job.json``. A project
ordered for active learning (``backend.prelabel --annotate-next``) is then pre-labeled with that
version and its order renewed (:func:`renew_order`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from backend.annotations import AnnotationError, results_to_label_map, validate_results
from backend.control_tags import ControlTag
from backend.images import ImageError, ImageFetcher
from backend.label_config import parse_targets
from backend.label_studio_client import LabelStudioClient
from backend.local_training import FAILURE_PREFIX
from backend.prelabel import Prelabeler
from backend.runtime import ModelRuntime, load_model
from backend.service import SegmentationService
from backend.settings import Settings
from backend.store import ProjectIdError, Store, Version, project_key
from model.build import SegmentationModel
from model.calibration import (
    calibrate,
    expected_calibration_error,
    fit_confidence_scale,
    fit_min_score,
    scale_confidence,
)
from model.checkpoint import save_checkpoint
from model.files import atomic_write
from model.train import Sample, TrainConfig, finetune
from model.vocabulary import UNLABELED, Vocabulary

log = logging.getLogger(__name__)

# The confidence scale is fitted on the images the version was trained on. Below this many, the version has learnt
# them by heart: its served pixels there are right far more often than on other images, and the scale made served
# pre-labels worse calibrated (10 images: ECE 4.6 -> 5.2 and 3.2 -> 10.8 on demo-clip and demo-clip-deep, though
# 8.4 -> 3.5 on demo-clip-p16; from 20 it helps on all three: README, *Measured → Calibration*).
CONFIDENCE_SCALE_MIN_IMAGES = 20


def write_progress(path: Path, **state) -> None:
    """Best effort: progress is for people watching; a full disk must not stop the job here."""
    try:
        atomic_write(path, json.dumps({**state, "updated": time.time()}).encode())
    except OSError as error:
        log.warning("progress not written: %s", describe_error(error))


def describe_error(error: BaseException) -> str:
    """An error as an operator reads it: the OS's words for OS errors, with the file's name only."""
    if isinstance(error, OSError) and error.errno is not None:
        where = f" (writing {Path(error.filename).name})" if error.filename else ""
        return f"{os.strerror(error.errno)}{where}"
    return f"{error.__class__.__name__}: {error}"


def label_studio(settings: Settings, purpose: str) -> LabelStudioClient:
    """The project's Label Studio, as its job's environment names it, for ``purpose`` (said when none is known)."""
    if not (settings.label_studio_url and settings.label_studio_api_key):
        raise RuntimeError(f"{purpose}: no Label Studio address and token are known for the project "
                           "(LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or its /setup)")
    return LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key, timeout=300)


def pull_annotations(settings: Settings, store: Store, project: str) -> int:
    """Replace the stored annotations by Label Studio's current ones (its JSON export)."""
    client = label_studio(settings, "pulling annotations")
    exported = client.export_annotations(project)
    store.set_label_config(project, client.label_config(project))
    return store.replace_annotations(project, exported)


def build_samples(annotations: list[dict], label_config: str, fetcher: ImageFetcher,
                  skipped: list[dict] | None = None) -> tuple[list[Sample], Vocabulary]:
    """Annotated images as samples, in the vocabulary of every label of the config (the one pre-labels are served
    in; :func:`restrict_to_annotated` gives the classes training learns).

    Every segmentation target of the config is learnt from: the targets reading one image are
    painted into one label map, over all their labels. Where one of them names other things the images show
    (``model_background``), what the annotation leaves unpainted is one of those (``Sample.background``), and an
    annotation that paints nothing says the image shows none of the labels. An annotation that can't be used (an
    image can't be fetched, or its regions are malformed, e.g. stored before the webhook
    validated them) is skipped and appended to ``skipped``.
    """
    targets = parse_targets(label_config)
    vocabulary = Vocabulary.merge(t.vocabulary for t in targets)
    by_image: dict[str, list[ControlTag]] = {}
    for target in targets:  # each target's results painted in the merged vocabulary's indices
        by_image.setdefault(target.data_key, []).append(dataclasses.replace(target, vocabulary=vocabulary))
    background = {target.data_key for target in targets if target.vocabulary.others}  # images whose tags name others
    samples = []
    for annotation in annotations:
        try:
            validate_results(annotation["result"], fetcher.max_pixels)
            samples.extend(_annotation_samples(annotation, by_image, background, fetcher))
        except (ImageError, AnnotationError, KeyError, TypeError, ValueError) as error:
            reason = str(error) if isinstance(error, (ImageError, AnnotationError)) else \
                f"{error.__class__.__name__}: {error}"
            log.warning("task %s skipped: %s", annotation["task_id"], reason)
            if skipped is not None:
                skipped.append({"task_id": annotation["task_id"], "reason": reason[:300]})
    return samples, vocabulary


def _annotation_samples(annotation: dict, by_image: dict[str, list[ControlTag]], background: set[str],
                        fetcher: ImageFetcher) -> list[Sample]:
    """One sample per image of the annotation that has annotated pixels, or whose tags name other things."""
    samples = []
    for data_key, targets in by_image.items():
        image = fetcher.fetch((annotation["data"] or {})[data_key], annotation["task_id"])
        labels = None
        for target in targets:
            labels = results_to_label_map(annotation["result"], target, *image.shape[:2], label_map=labels)
        if data_key in background or (labels >= 0).any():
            samples.append(Sample(image, labels, background=data_key in background))
    return samples


def restrict_to_annotated(samples: list[Sample], vocabulary: Vocabulary) -> tuple[list[Sample], Vocabulary]:
    """Re-index the samples into the vocabulary of the classes annotated in them, then, where a sample's unpainted
    pixels are other things (``Sample.background``), every other thing ``vocabulary`` names.

    Labels nobody annotated are not negatives: a class absent from the annotations would
    otherwise be trained towards never being predicted.
    """
    classes = sorted({int(c) for sample in samples for c in np.unique(sample.labels) if c >= 0})
    if not classes:
        return [], vocabulary
    others = list(range(len(vocabulary.served), len(vocabulary))) if any(s.background for s in samples) else []
    remap = np.full(len(vocabulary) + 1, UNLABELED, np.int64)
    remap[classes] = np.arange(len(classes))
    restricted = [dataclasses.replace(sample, labels=remap[sample.labels]) for sample in samples]
    kept = classes + others
    return restricted, Vocabulary(tuple(vocabulary.labels[c] for c in kept), tuple(vocabulary.texts[c] for c in kept),
                                  len(others))


def train_config(settings: Settings, **overrides) -> TrainConfig:
    """The fine-tuning a training job runs under ``settings``; ``overrides`` replace fields of it (the benchmarks'
    steps, crop size and ablations), so a benchmark trains as a job does and answers the same settings."""
    config = TrainConfig(steps=settings.train_steps, batch_size=settings.train_batch_size, lr=settings.train_lr,
                         size=settings.inference_size, diversify=settings.text_diversification,
                         distill=settings.distillation, synonym_threshold=settings.synonym_threshold,
                         distill_weight=settings.distill_weight, seed=settings.train_seed,
                         paste=settings.train_paste, precision=settings.precision)
    return dataclasses.replace(config, **overrides)


def train_project(settings: Settings, project: str, pull: bool = False,
                  runtime: ModelRuntime | None = None) -> Version:
    """Fine-tune on the project's annotations; register and return the new version. ``runtime`` loads the base
    model (once: a job that then pre-labels the project serves from the same one)."""
    store = Store(settings.model_dir)
    directory = store.project_dir(project)
    directory.mkdir(parents=True, exist_ok=True)
    # One job per project across every backend worker process: later ones wait their turn.
    lock = open(directory / "train.lock", "w")  # noqa: SIM115 (held, so locked, until the process ends)
    fcntl.flock(lock, fcntl.LOCK_EX)
    progress = directory / "job.json"
    started = time.time()
    write_progress(progress, state="preparing", pid=os.getpid(), started=started)
    if pull:
        log.info("project %s: pulled %d annotations from Label Studio", project,
                 pull_annotations(settings, store, project))
    changes = store.changes_since_training(project)
    samples, vocabulary, skipped = _project_samples(settings, store, project)
    model = (runtime or ModelRuntime(settings, store)).load()
    config = train_config(settings)
    segmenter = model.segmenter(seed=config.seed)
    log.info("project %s: training on %d images, classes %s", project, len(samples), list(vocabulary.labels))

    def report(step: int, losses: dict) -> None:
        if step % 10 == 0 or step == config.steps:
            write_progress(progress, state="training", pid=os.getpid(), started=started,
                           **{**losses, "steps": config.steps})

    trained_samples, trained = restrict_to_annotated(samples, vocabulary)
    summary = finetune(segmenter, model.clip, model.encoder, trained_samples, trained, config, progress=report)
    write_progress(progress, state="calibrating", pid=os.getpid(), started=started)
    # The fine-tuned model's own annotations calibrate it about as well as held-out ones would
    # (bench.calibration), so no annotation is set aside from training.
    summary.update(fit_serving_rules(model.predictor(segmenter, temperature=1.0), samples, vocabulary, settings))
    summary.update(images=len(samples), classes=list(trained.served),
                   background=list(trained.labels[len(trained.served):]), skipped_annotations=len(skipped),
                   skipped=skipped[:20])
    version = store.add_version(project, summary, lambda number, path: save_checkpoint(
        path, segmenter, model.identity, project=project, version=number, **summary))
    if store.changes_since_training(project) == changes:
        store.reset_changes(project)
    write_progress(progress, state="finished", version=version.version, started=started,
                   seconds=round(time.time() - started, 1))
    log.info("project %s: version v%d ready (%s)", project, version.version, version.path)
    return version


def renew_order(settings: Settings, project: str, batch: int,
                model_loader: Callable[[Settings], SegmentationModel] = load_model, keep_versions: int = 0) -> dict:
    """Pre-label a project whose tasks ``backend.prelabel --annotate-next`` ordered (for a next ``batch``) with its
    newest version, and renew that order (:class:`backend.prelabel.Prelabeler`), so an active-learning loop needs
    no step beyond annotating. ``model_loader``: the base model (the job's, which trained the version);
    ``keep_versions``: the model's versions whose predictions stay (``--keep-versions``; 0: all). Returns the
    pre-labeler's counts."""
    client = label_studio(settings, "pre-labeling with the new version (run backend.prelabel --annotate-next by "
                                    "hand)").sdk
    log.info("project %s: pre-labeling with the new version and renewing the order for a batch of %d", project,
             batch)
    service = SegmentationService(settings, model_loader)
    service.start()
    return Prelabeler(client, service, int(project), annotate_next=batch,
                      keep_versions=keep_versions).run(progress=False)


def fit_serving_rules(predictor, samples: list[Sample], vocabulary: Vocabulary, settings: Settings) -> dict:
    """Calibrate a fine-tuned ``predictor`` (temperature and presence weight, then its served confidences:
    :func:`fit_served_confidence`) and fit its ``min_region_score`` on the annotations, in the ``vocabulary`` its
    pre-labels are served in: every label of the config, not only those the annotations show. Fitted in the
    annotated labels alone, the fit never sees the others take pixels from them, and weighs the frozen CLIP's
    image-level view, which keeps those labels, near zero.

    Returns:
        :func:`model.calibration.calibrate`'s summary with the confidence scale, ``min_region_score`` and the
        ``region_recall_weight`` it was fitted with.
    """
    summary = calibrate(predictor, [s.image for s in samples], [s.labels for s in samples], vocabulary)
    summary.update(fit_served_confidence(predictor, samples, vocabulary, settings))
    # The rule is fitted as the version's pre-labels are served, on the scores the scale makes of them.
    summary["min_region_score"] = fit_min_score(*region_scores(predictor, samples, vocabulary, settings),
                                                settings.region_recall_weight)
    summary["region_recall_weight"] = settings.region_recall_weight
    return summary


def fit_served_confidence(predictor, samples: list[Sample], vocabulary: Vocabulary, settings: Settings,
                          chunk: int = 32, pixels_per_image: int = 4096,
                          min_images: int = CONFIDENCE_SCALE_MIN_IMAGES) -> dict:
    """Fit how a calibrated fine-tuned ``predictor``'s served confidences map to how often they are right, on the
    annotated pixels its unpruned pre-labels label, and on those the annotation leaves to other things the tag names
    (:func:`model.calibration.fit_confidence_scale`), and set it.
    The temperature is fitted on the upsampled map; refinement then moves boundaries to the image's edges and gets
    right more pixels than those probabilities say (served, the versions of three CLIPs read a pixel ECE of 7 to
    13 %; README, *Measured → Calibration*). Below ``min_images`` images nothing is fitted (the version knows them by
    heart: :data:`CONFIDENCE_SCALE_MIN_IMAGES`).

    Returns:
        ``confidence_scale`` (a, b) or None, and the served pixel ECE (%) on these annotations before and after.
    """
    predictor.confidence_scale = None
    if len(samples) < min_images:
        return {"confidence_scale": None}
    unpruned = dataclasses.replace(settings.region_rules(0.0, zero_shot=False), region_check=False)
    rng, confidence, correct = np.random.default_rng(0), [], []
    for start in range(0, len(samples), chunk):
        batch = samples[start:start + chunk]
        for sample, p in zip(batch, predictor.predict([s.image for s in batch], vocabulary, unpruned), strict=True):
            # Where the tag names other things, a pixel the annotation leaves unpainted is one of them: labeled, wrong.
            judged = np.flatnonzero(((sample.labels >= 0) | sample.background) & (p.label_map >= 0))
            pick = rng.choice(judged, min(len(judged), pixels_per_image), replace=False)
            confidence.append(p.confidence.ravel()[pick])
            correct.append(p.label_map.ravel()[pick] == sample.labels.ravel()[pick])
    confidence, correct = np.concatenate(confidence), np.concatenate(correct)
    if not len(correct):
        return {"confidence_scale": None}
    scale = fit_confidence_scale(confidence, correct)
    predictor.confidence_scale = scale
    scaled = scale_confidence(torch.from_numpy(confidence), scale).numpy()
    return {"confidence_scale": [round(value, 4) for value in scale],
            "served_ece_before": round(expected_calibration_error(confidence, correct), 2),
            "served_ece_after": round(expected_calibration_error(scaled, correct), 2)}


def region_scores(predictor, samples: list[Sample], vocabulary: Vocabulary, settings: Settings,
                  chunk: int = 32) -> tuple[list[dict[int, float]], list[set[int]]]:
    """Per sample, the score of each region its served pre-label finds (unpruned) and the labels its annotation
    shows: what :func:`model.calibration.fit_min_score` fits on. Only regions of labels some annotation shows
    count: the rule spares the others when served (``RegionRules.unscored``)."""
    present = [{int(c) for c in np.unique(s.labels) if c >= 0} for s in samples]
    annotated = set().union(*present)
    found = []
    # Without the region check, which would leave the scores found as they are at the cost of a pass.
    unpruned = dataclasses.replace(settings.region_rules(0.0, zero_shot=False), region_check=False)
    for start in range(0, len(samples), chunk):
        batch = samples[start:start + chunk]
        predictions = predictor.predict([s.image for s in batch], vocabulary, unpruned)
        found += [{c: score for c, score in p.found_scores.items() if c in annotated} for p in predictions]
    return found, present


def _project_samples(settings: Settings, store: Store, project: str) -> tuple[list[Sample], Vocabulary, list[dict]]:
    """The stored annotations as samples, their vocabulary, and the annotations skipped (with why)."""
    label_config = store.label_config(project)
    if not label_config:
        raise RuntimeError(f"project {project}: no label config known yet (connect the backend or pass one)")
    skipped: list[dict] = []
    samples, vocabulary = build_samples(store.annotations(project), label_config,
                                        ImageFetcher.from_settings(settings), skipped)
    if not samples:
        raise RuntimeError(f"project {project}: no usable annotations to train on"
                           + (f" ({len(skipped)} skipped, e.g. task {skipped[0]['task_id']}: "
                              f"{skipped[0]['reason']})" if skipped else ""))
    return samples, vocabulary, skipped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backend.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", required=True)
    parser.add_argument("--pull", action="store_true", help="pull annotations from Label Studio's API first")
    parser.add_argument("--export", type=Path, help="a Label Studio JSON export file to train from")
    parser.add_argument("--label-config", type=Path, help="the project's label config (XML), with --export")
    args = parser.parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        project = project_key(args.project)
    except ProjectIdError as error:
        sys.exit(f"training: {error}")
    _exit_with_parent()
    store = Store(settings.model_dir)
    if args.export:
        if args.label_config:
            store.set_label_config(project, args.label_config.read_text())
        count = store.replace_annotations(project, json.loads(args.export.read_text()))
        log.info("project %s: %d annotations read from %s", project, count, args.export)
    # One base model for the job: loading it again to pre-label cost about 5 s and 0.7 GiB of peak memory (ViT-B-16).
    runtime = ModelRuntime(settings, store)
    try:
        version = train_project(settings, project, pull=args.pull, runtime=runtime)
    except Exception as error:
        log.exception("project %s: training failed", project)
        reason = describe_error(error)
        write_progress(store.project_dir(project) / "job.json", state="failed", error=reason)
        # The last line is the report the service shows (backend.jobs reads it from the pipe).
        print(f"{FAILURE_PREFIX}{reason}", file=sys.stderr, flush=True)
        sys.exit(1)
    report = {"project": project, "version": version.name, "path": str(version.path)}
    batch = store.annotate_next(project)
    if batch:
        progress = store.project_dir(project) / "job.json"
        finished = {"state": "finished", "version": version.version}
        with contextlib.suppress(OSError, ValueError):
            finished = json.loads(progress.read_text())
        write_progress(progress, **{**finished, "state": "pre-labeling"})
        try:
            report["prelabel"] = renew_order(settings, project, batch, lambda _settings: runtime.load(),
                                             store.keep_versions(project))
        except Exception as error:  # the version stands; the command (or the next training) renews the order
            log.exception("project %s: pre-labeling with the new version failed", project)
            report["prelabel"] = {"error": describe_error(error)}
        write_progress(progress, **{**finished, "prelabel": report["prelabel"]})
    print(json.dumps(report))


def _exit_with_parent() -> None:
    """A job started by the service ends when the service's process does, even on kill -9:
    a version registered after the service stopped would surprise whoever restarts it."""
    parent = os.getppid()
    if os.environ.get("GKC_JOB_OF_SERVICE") != str(parent):
        return  # run by hand

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    main()
