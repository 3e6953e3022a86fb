"""Interactive refinement measured as the interactive-segmentation literature does: a click simulator.

    python -m bench.interactive [--images 60] [--max-clicks 20] [--skip-speed]
                                [--model ViT-B-16] [--size 448] [--photo 1920x1080] [--repeats 5]

Each object is one label of one scene (the label's pixels, at least 1% of the scene). The
simulator's next click goes at the interior point (the farthest from its border) of the largest
error region: positive on a missed part, negative on a wrong one. Reported per method: NoC@85 and
NoC@90 (the mean number of clicks until the object's IoU reaches 85% / 90%, capped at
``--max-clicks``; 0 when the start already does) and the mean IoU after 0, 1, 3 and 5 clicks (an
object stops getting clicks once it reaches 90%).

Methods, all on the zero-shot demo model:

* **(a) from the pre-label** (the backend's): :func:`model.refinement.refine`, starting from the
  served pre-label; also without its "one example → all of this class" search;
* **(b) clicks alone**: the same clicks' prototypes from an empty mask, with no text;
* **(c) components only** (a baseline): starting from the pre-label, a positive click adds the whole
  pre-label region under it, a negative click removes the mask's connected part under it.

Two worlds: the demo world's test scenes, where the constants were chosen, and the shifted world
(:func:`demo.world.shifted_scenes`), never tuned on. Then "one example → all of this class" on
scenes with three copies of one thing (:func:`one_example`), and the speed of clicks against a
whole /predict through the backend, with a real architecture's random weights (:func:`click_speed`).
"""
from __future__ import annotations

import argparse
import threading
import time

import cv2
import numpy as np
import torch

from backend.settings import Settings
from demo import world
from demo.train_clip import DEMO_CLIPS, parse_bench_arguments
from model.build import SegmentationModel
from model.clip import load_clip
from model.config import ModelConfig
from model.refinement import ImageState, Prompt, refine
from model.vocabulary import Vocabulary

VOCABULARY = Vocabulary.from_labels(world.NAMES)
MIN_OBJECT = 0.01
CHECKPOINTS = (0, 1, 3, 5)


def next_click(truth: np.ndarray, mask: np.ndarray) -> tuple[float, float, bool]:
    """(x, y, positive): the interior point of the largest error region."""
    best = None
    for positive, error in ((True, truth & ~mask), (False, mask & ~truth)):
        count, components, stats, _ = cv2.connectedComponentsWithStats(error.astype(np.uint8), connectivity=8)
        for index in range(1, count):
            area = stats[index, cv2.CC_STAT_AREA]
            if best is None or area > best[0]:
                best = (area, positive, components == index)
    _, positive, region = best
    distance = cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(distance.argmax()), distance.shape)
    return x + 0.5, y + 0.5, positive


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    return float((mask & truth).sum() / max(1, (mask | truth).sum()))


class Refined:
    """The backend's refinement (``from_prelabel``) or clicks alone: each answer from all clicks so far."""

    def __init__(self, from_prelabel: bool, rules, find_all: bool = True):
        self.from_prelabel, self.rules, self.find_all = from_prelabel, rules, find_all

    def start(self, state: ImageState, label: int) -> np.ndarray:
        self.state, self.label, self.clicks = state, label, []
        if not self.from_prelabel:
            return np.zeros((state.height, state.width), bool)
        return _full_size(state.prelabel(self.rules), state) == label

    def click(self, x: float, y: float, positive: bool) -> np.ndarray:
        self.clicks.append((x, y, positive))
        prompt = Prompt(self.label, tuple(self.clicks))
        return refine(self.state, prompt, self.rules, self.from_prelabel, self.find_all)[0]


class ComponentsOnly:
    """The baseline: whole pre-label regions added, connected parts of the mask removed."""

    def __init__(self, rules):
        self.rules = rules

    def start(self, state: ImageState, label: int) -> np.ndarray:
        self.prelabel = _full_size(state.prelabel(self.rules), state)
        self.mask = self.prelabel == label
        return self.mask

    def click(self, x: float, y: float, positive: bool) -> np.ndarray:
        row, col = int(y), int(x)
        source = (self.prelabel == self.prelabel[row, col]) if positive else self.mask
        _, components = cv2.connectedComponents(source.astype(np.uint8), connectivity=8)
        part = components == components[row, col]
        self.mask = (self.mask | part) if positive else (self.mask & ~part)
        return self.mask


def _full_size(label_map: torch.Tensor, state: ImageState) -> np.ndarray:
    rows = np.arange(state.height) * label_map.shape[0] // state.height
    cols = np.arange(state.width) * label_map.shape[1] // state.width
    return label_map.cpu().numpy()[rows[:, None], cols[None]]


def wrong_prelabel(state: ImageState, truth: np.ndarray, label: int, rules) -> ImageState | None:
    """``state`` whose served pre-label is wrong for ``label``: the label's region covers the scene's largest
    other object instead, and the real object wears that object's label (as a pre-label that took the
    road for the car); None when the scene has no other object of :data:`MIN_OBJECT`."""
    sizes = np.bincount(truth[truth < len(world.NAMES)].ravel(), minlength=len(world.NAMES)) / truth.size
    sizes[label] = 0
    other = int(sizes.argmax())
    if sizes[other] < MIN_OBJECT:
        return None
    prelabel = state.prelabel(rules).clone()
    height, width = prelabel.shape
    small = torch.from_numpy(truth[np.arange(height) * state.height // height][:, np.arange(width) * state.width // width])
    prelabel[prelabel == label] = other
    prelabel[small == label], prelabel[small == other] = other, label
    return state.with_prelabel(rules, prelabel)


def simulate(method, states: list[ImageState], scenes, max_clicks: int, wrong_rules=None) -> dict[str, float]:
    """NoC@85, NoC@90 and the IoU after each of :data:`CHECKPOINTS` clicks, averaged over the objects;
    given ``wrong_rules``, each object's pre-label under those rules is made wrong first (:func:`wrong_prelabel`)
    and the first click is a positive one on the object."""
    curves = []
    for state, (_, truth) in zip(states, scenes, strict=True):
        for label in np.unique(truth):
            target = truth == label
            if label >= len(world.NAMES) or target.mean() < MIN_OBJECT:
                continue
            start = state if wrong_rules is None else wrong_prelabel(state, truth, int(label), wrong_rules)
            if start is None:
                continue
            mask = method.start(start, int(label))
            curve = [iou(mask, target)]
            while len(curve) <= max_clicks and curve[-1] < 0.9:
                # Where the pre-label put the label elsewhere, the annotator's first click is on the object.
                seen = np.zeros_like(mask) if wrong_rules is not None and len(curve) == 1 else mask
                mask = method.click(*next_click(target, seen))
                curve.append(iou(mask, target))
            curves.append(curve + [curve[-1]] * (max_clicks + 1 - len(curve)))
    curves = np.array(curves)
    noc = {f"NoC@{round(100 * t)}": float(np.mean([next((k for k, v in enumerate(c) if v >= t), max_clicks)
                                                    for c in curves])) for t in (0.85, 0.9)}
    return {"objects": len(curves), **noc, **{f"IoU@{k}": 100 * float(curves[:, k].mean()) for k in CHECKPOINTS}}


def one_example(states: list[ImageState], scenes, rules) -> None:
    """Scenes with three copies of one thing: for each thing the pre-label missed, one positive click on
    the first copy (the simulator's), then the thing's IoU and the share of the other copies' pixels found."""
    rows = {True: [], False: []}
    for state, (_, truth) in zip(states, scenes, strict=True):
        label = int(next(c for c in np.unique(truth) if c in world.THINGS))
        target = truth == label
        if (_full_size(state.prelabel(rules), state) == label).any():
            continue
        x, y, _ = next_click(target, np.zeros_like(target))
        _, copies = cv2.connectedComponents(target.astype(np.uint8), connectivity=8)
        others = target & (copies != copies[int(y), int(x)])
        for find_all in rows:
            mask = refine(state, Prompt(label, ((x, y, True),)), rules, find_all=find_all)[0]
            rows[find_all].append((iou(mask, target), (mask & others).sum() / max(1, others.sum())))
    print(f"\none example → all of this class: {len(scenes)} scenes with three copies of one thing; "
          f"{len(rows[True])} things the zero-shot pre-label missed, one positive click on one copy\n\n"
          "| after the click | thing IoU | other copies found |\n|---|---|---|")
    for find_all, name in ((True, "the backend's (finds the class's other regions)"), (False, "the click's part only")):
        values = np.array(rows[find_all])
        print(f"| {name} | {100 * values[:, 0].mean():.1f} | {100 * values[:, 1].mean():.1f}% |")


def largest_part(target: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The bool ``target``'s largest 8-connected part, and its bounding box (left, top, right, bottom), exclusive."""
    _, parts, stats, _ = cv2.connectedComponentsWithStats(target.astype(np.uint8), connectivity=8)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    left, top, width, height = (int(v) for v in stats[largest, :4])
    return parts == largest, (left, top, left + width, top + height)


def one_box(states: list[ImageState], scenes, rules) -> dict[str, float]:
    """Each object's largest part boxed as an annotator draws it (2 px outside it), one box and no click: the
    mean IoU of the answer with that part, and the share of parts reaching 85 %."""
    ious = []
    for state, (_, truth) in zip(states, scenes, strict=True):
        for label in np.unique(truth):
            if label >= len(world.NAMES) or (truth == label).mean() < MIN_OBJECT:
                continue
            part, (left, top, right, bottom) = largest_part(truth == label)
            box = (max(0.0, left - 2.0), max(0.0, top - 2.0), min(state.width, right + 2.0),
                   min(state.height, bottom + 2.0))
            ious.append(iou(refine(state, Prompt(int(label), boxes=(box,)), rules)[0], part))
    return {"objects": len(ious), "IoU": 100 * float(np.mean(ious)), "IoU>=85": 100 * float(np.mean(np.array(ious) >= 0.85))}


def states_for(predictor, scenes) -> list[ImageState]:
    images = [image for image, _ in scenes]
    return [ImageState.from_image(*scores, image, predictor)
            for scores, image in zip(predictor.logits_and_embeddings(images, VOCABULARY), images,
                                                   strict=True)]


class ClickSession:
    """A photo's task through the backend (Flask test client): its opening /predict, clicks and batches, each
    call timed in seconds, with or without a click tool in the project's config."""

    CLICK = {"result": [{"type": "keypointlabels", "to_name": "image", "from_name": "click", "is_positive": True,
                         "value": {"x": 50.0, "y": 60.0, "width": 0.5, "keypointlabels": ["road"]}}]}

    def __init__(self, client, picture: np.ndarray, vocabulary: Vocabulary):
        from bench.speed import brush_config, data_uri

        self.client, self.service = client, client.application.config["service"]
        self.task = {"id": 1, "data": {"image": data_uri(picture)}}
        self.plain = brush_config(vocabulary)
        labels = "".join(f'<Label value="{name}"/>' for name in vocabulary.labels)
        self.clicking = self.plain.replace(
            "</View>", f'<KeyPointLabels name="click" toName="image" smart="true">{labels}</KeyPointLabels></View>')

    def timed(self, context=None, tasks=None, clicks: bool = True) -> float:
        params = {"context": context} if context else {}
        payload = {"tasks": list(tasks or (self.task,)), "label_config": self.clicking if clicks else self.plain,
                   "params": params}
        started = time.perf_counter()
        response = self.client.post("/predict", json=payload)
        elapsed = time.perf_counter() - started
        assert response.status_code == 200 and "result" in response.get_json()["results"][0], response.get_json()
        return elapsed

    @staticmethod
    def settle() -> None:
        """Wait for the last opening's superpixels, made beside its answer."""
        for thread in threading.enumerate():
            if thread.name == "superpixels":
                thread.join()

    def forget(self) -> None:
        self.settle()
        self.service.passes.clear()

    def opened(self, click_after: float | None = None) -> float:
        """The opening /predict, or with ``click_after`` a first click that many seconds after it."""
        self.forget()
        if click_after is None:
            return self.timed()
        self.timed()
        time.sleep(click_after)  # the annotator looks at the pre-label
        return self.timed(self.CLICK)

    def cold_click(self) -> float:
        self.forget()
        return self.timed(self.CLICK)

    def batched(self) -> float:
        """Per task of a batch of two."""
        return self.timed(tasks=(self.task, {**self.task, "id": 2})) / 2


def click_speed(model_name: str, size: int, picture_size: tuple[int, int], repeats: int) -> None:
    """Through the backend (random weights): a whole /predict of one photo against the clicks on it. A /predict
    of one task (an annotator opening it) keeps its pass where the config has a click tool, and makes the
    superpixels beside its answer: its cost shows against the same config without a click tool and against a
    task in a batch. A cold click has no kept pass (a new image, or one evicted); the first click after opening
    reuses the /predict's pass (at once: it waits for the superpixels); later ones reuse all. The calls are
    timed in interleaved rounds, each started with no superpixels still being made, so the ratios compare calls
    made under the same conditions."""
    from bench.speed import client_for, photo

    vocabulary = Vocabulary.from_labels(world.NAMES)
    model = SegmentationModel(load_clip(model_name, "random"), ModelConfig(inference_size=size, refine_boundaries=False))
    client = client_for(model, Settings(clip_model=model_name, clip_pretrained="random", inference_size=size))
    session = ClickSession(client, photo(*picture_size), vocabulary)
    calls = {"whole /predict of the task, config with a click tool (keeps its pass)": session.opened,
             "the same, config without a click tool (keeps nothing)": lambda: session.timed(clicks=False),
             "the same, per task of a batch of two (keeps nothing)": session.batched,
             "a click, cold (no kept pass)": session.cold_click,
             "the first click, at once after opening (waits for the superpixels)": lambda: session.opened(0.0),
             "the first click, 1 s after opening": lambda: session.opened(1.0),
             "each later click": lambda: session.timed(session.CLICK)}
    seconds = {name: [] for name in calls}
    for round_ in range(repeats + 1):  # the first is a warm-up
        for name, call in calls.items():
            session.settle()
            elapsed = call()
            if round_:
                seconds[name].append(elapsed)
    ms = {name: 1000 * float(np.median(values)) for name, values in seconds.items()}
    whole = next(iter(ms.values()))
    print(f"\nclick speed: {model_name} (random weights) at {size} px, a {picture_size[0]}x{picture_size[1]} photo, "
          f"{len(vocabulary.labels)} labels, CPU ({torch.get_num_threads()} threads), median of {repeats}\n\n"
          "| call | ms | share of a whole /predict |\n|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.0f} | {value / whole:.0%} |", flush=True)


WRONG_PRELABEL_METHODS = ("(a) from the zero-shot pre-label (the backend's)", "(b) clicks alone")


def _row(name: str, method, states, scenes, max_clicks: int, wrong_rules=None) -> None:
    started = time.perf_counter()
    row = simulate(method, states, scenes, max_clicks, wrong_rules)
    print(f"| {name} | {row['objects']} | {row['NoC@85']:.2f} | {row['NoC@90']:.2f} | "
          + " | ".join(f"{row[f'IoU@{k}']:.1f}" for k in CHECKPOINTS)
          + f" |  ({time.perf_counter() - started:.0f} s)", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.interactive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--max-clicks", type=int, default=20)
    parser.add_argument("--skip-speed", action="store_true", help="only the click simulator")
    parser.add_argument("--model", default="ViT-B-16", help="the architecture timed (random weights)")
    parser.add_argument("--size", type=int, default=448, help="its inference size")
    parser.add_argument("--photo", default="1920x1080", help="the photo clicked on, WIDTHxHEIGHT")
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_bench_arguments(parser, argv)
    model = DEMO_CLIPS[args.clip].model(refine_boundaries=True)
    predictor = model.predictor()  # its pre-labels as the backend serves them
    rules = Settings().region_rules()
    methods = {"(a) from the zero-shot pre-label (the backend's)": Refined(True, rules),
               "(a) without \"one example → all of this class\"": Refined(True, rules, find_all=False),
               "(b) clicks alone": Refined(False, rules),
               "(c) components only, from the pre-label": ComponentsOnly(rules)}
    for world_name, scenes in (("demo world", world.test_scenes(args.images)),
                               ("shifted world", world.shifted_scenes(args.images))):
        states = states_for(predictor, scenes)
        print(f"\n{world_name}: {args.images} scenes, zero-shot, at most {args.max_clicks} clicks\n\n"
              "| method | objects | NoC@85 | NoC@90 | " + " | ".join(f"IoU@{k}" for k in CHECKPOINTS) + " |\n"
              "|---|---|---|---|" + "---|" * len(CHECKPOINTS), flush=True)
        for name, method in methods.items():
            _row(name, method, states, scenes, args.max_clicks)
        print(f"\n{world_name}, each clicked label's pre-label wrong (it covers the scene's largest other object, "
              "which the real object is labelled as)\n", flush=True)
        for name in WRONG_PRELABEL_METHODS:
            _row(name, methods[name], states, scenes, args.max_clicks, wrong_rules=rules)
        boxed = one_box(states, scenes, rules)
        print(f"\n{world_name}, one box around each object's largest part: {boxed['objects']} objects, IoU "
              f"{boxed['IoU']:.1f}, {boxed['IoU>=85']:.0f} % of them at 85 % or more", flush=True)
    repeated = world.repeated_scenes(args.images)
    one_example(states_for(predictor, repeated), repeated, rules)
    if not args.skip_speed:
        width, height = (int(v) for v in args.photo.split("x"))
        click_speed(args.model, args.size, (width, height), args.repeats)


if __name__ == "__main__":
    main()
