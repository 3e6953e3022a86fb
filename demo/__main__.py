"""``make demo``: a real Label Studio pre-labeled by our backend, from scratch, offline.

    make demo                                   # Label Studio on :8080, the backend on :9090
    make demo LS_PORT=8081 BACKEND_PORT=9091    # other ports

Starts Label Studio and the backend (demo model) on 127.0.0.1, creates a project from
``labeling_config/demo-world.xml``, imports demo-world images, connects the backend, asks
Label Studio to pre-label every task, selects that model version in the project and adds a
Data Manager tab that shows the prediction scores, lowest first, and a second project of a few
scenes connected for clicks and boxes (smart-only key points and boxes). It reports the mIoU of the predictions Label
Studio stored, prints the login, the API token and a ready-to-paste ``backend.prelabel``
command, and keeps both servers running until Ctrl-C.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from xml.sax.saxutils import escape

from backend.annotations import results_to_label_map
from backend.label_config import parse_targets
from backend.settings import Settings
from demo import world
from demo.labelstudio import DEMO_MODEL_SETTINGS, ROOT, LabelStudio, backend_env, port_is_free, start_backend
from model.evaluation import ConfusionMatrix

CONFIG = ROOT / "labeling_config" / "demo-world.xml"
SCENE_NAME = re.compile(r"scene-(\d+)\.png$")
INTERACTIVE_TASKS = 6
ANNOTATE_NEXT_BATCH = 6  # the printed active-learning batch, unless TRAIN_AFTER_ANNOTATIONS sets one


def with_smart_tools(label_config: str) -> str:
    """``label_config`` with smart-only key points and boxes over its segmentation labels: there is no plain
    key-point tool to pick by mistake, and the toolbar's smart button picks the smart key point first."""
    labels = "".join(f'<Label value="{escape(label)}"/>' for label in parse_targets(label_config)[0].vocabulary.served)
    tags = "".join(f'  <{tag} name="{name}" toName="image" smart="true" smartOnly="true">{labels}</{tag}>\n'
                   for tag, name in (("KeyPointLabels", "click"), ("RectangleLabels", "box")))
    # The segmentation tag's own smart tool would come first in the toolbar's smart group; the backend answers clicks and boxes.
    return label_config.replace("<BrushLabels ", '<BrushLabels smart="false" ').replace("</View>", tags + "</View>")


def interactive_project(label_studio: LabelStudio, backend_url: str, scenes, label_config: str) -> int:
    """A second project, connected for clicks and boxes, on the first scenes, pre-labeled."""
    project = label_studio.create_project("Clicks and boxes (demo world)", with_smart_tools(label_config))
    label_studio.import_images(project, {f"scene-{i:03d}.png": image for i, (image, _) in enumerate(scenes)})
    label_studio.connect_backend(project, backend_url, interactive=True)
    label_studio.retrieve_predictions(project)
    label_studio.select_predictions(project)
    return project


def stored_predictions(label_studio: LabelStudio, project: int, scenes,
                       label_config: str) -> tuple[ConfusionMatrix, dict[int, tuple[int, float]]]:
    """Decode the predictions Label Studio stored and score them against the scenes' truth; and
    each task's (region count, task score), by task id."""
    target = parse_targets(label_config)[0]
    confusion = ConfusionMatrix(len(target.vocabulary))
    tasks = {}
    for task in label_studio.tasks(project):
        match = SCENE_NAME.search(task["data"]["image"])
        if not match or not task.get("predictions"):
            continue
        prediction = task["predictions"][-1]
        truth = scenes[int(match.group(1))][1]
        confusion.update(truth, results_to_label_map(prediction["result"], target, *truth.shape))
        tasks[task["id"]] = (len(prediction["result"]), prediction.get("score") or 0.0)
    return confusion, tasks


def prelabel_command(model_dir: Path, label_studio: LabelStudio, project: int) -> str:
    """``backend.prelabel`` with the environment that names the demo model, ready to paste."""
    env = backend_env(model_dir, None)
    settings = " ".join(f"{name}={shlex.quote(env[name])}" for name in DEMO_MODEL_SETTINGS)
    return (f"{settings} {shlex.quote(sys.executable)} -m backend.prelabel --url {label_studio.url} "
            f"--token {label_studio.token} --project {project}")


def annotate_next_batch() -> int:
    """The active-learning batch the demo suggests: as large as ``TRAIN_AFTER_ANNOTATIONS``, where it is set, so each
    batch's last submit starts the training job that renews the order."""
    return Settings().train_after_annotations or ANNOTATE_NEXT_BATCH


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--ls-port", type=int, default=8080, help="Label Studio's port (make demo LS_PORT=...)")
    parser.add_argument("--backend-port", type=int, default=9090, help="the backend's port (make demo BACKEND_PORT=...)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".demo")
    parser.add_argument("--exit", action="store_true", help="stop after reporting instead of waiting for Ctrl-C")
    args = parser.parse_args(argv)
    for port, variable in ((args.ls_port, "LS_PORT"), (args.backend_port, "BACKEND_PORT")):
        if not port_is_free(port):
            sys.exit(f"demo: port {port} is busy; pick another one: make demo {variable}=<free port>")

    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    scenes = world.test_scenes(args.images)
    started = time.time()
    print(f"starting Label Studio on 127.0.0.1:{args.ls_port} (about a minute on first start)...", flush=True)
    label_studio = LabelStudio(args.work_dir / "label-studio", port=args.ls_port, password="demo-password")
    backend = None
    try:
        label_studio.start()
        print("starting the backend with the demo model...", flush=True)
        backend = start_backend(args.backend_port, args.work_dir / "model_dir", label_studio)
        label_config = CONFIG.read_text()
        project = label_studio.create_project("Open-vocabulary demo world", label_config)
        label_studio.import_images(project, {f"scene-{i:03d}.png": image for i, (image, _) in enumerate(scenes)})
        backend_url = f"http://127.0.0.1:{args.backend_port}"
        label_studio.connect_backend(project, backend_url)
        print(f"pre-labeling {len(scenes)} tasks through Label Studio...", flush=True)
        label_studio.retrieve_predictions(project)
        version = label_studio.select_predictions(project)
        label_studio.add_score_tab(project)
        clicks = interactive_project(label_studio, backend_url, scenes[:INTERACTIVE_TASKS], label_config)
        confusion, tasks = stored_predictions(label_studio, project, scenes, label_config)
        regions = [count for count, _ in tasks.values()]
        scores = [score for _, score in tasks.values()]
        first = tasks[min(tasks)][0] if tasks else 0
        base = [world.NAMES.index(n) for n in world.BASE]
        novel = [world.NAMES.index(n) for n in world.NOVEL]
        command = prelabel_command(args.work_dir / "model_dir", label_studio, project)
        print(
            f"\nLabel Studio: {label_studio.url}/projects/{project}/data\n"
            f"clicks and boxes (README's Clicks and boxes): {label_studio.url}/projects/{clicks}/data\n"
            f"login: {label_studio.username} / {label_studio.password}\n"
            f"API token: {label_studio.token}\n"
            f"backend: http://127.0.0.1:{args.backend_port} (PID {backend.pid}), Label Studio PID {label_studio.process.pid}\n"
            f"stored zero-shot predictions: mIoU all={confusion.miou():.1f} base={confusion.miou(base):.1f} "
            f"novel={confusion.miou(novel):.1f} (%, {len(scenes)} images); the project shows {version}\n"
            f"regions per task: {sum(regions) / max(1, len(regions)):.1f} on average, {first} on the first task; "
            f"task scores {min(scores, default=0):.2f}-{max(scores, default=0):.2f}\n"
            f"ready in {time.time() - started:.0f}s\n\n"
            f"pre-label the project again from the command line (the same model, so it skips what is done):\n"
            f"  {command}\n"
            f"order its tasks for a next batch of {annotate_next_batch()} (the Data Manager tab 'Annotate next'; "
            f"README's An active-learning loop; each training then renews the order):\n  "
            f"{command} --annotate-next {annotate_next_batch()}",
            flush=True)
        if not args.exit:
            print("press Ctrl-C to stop", flush=True)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        if backend:
            backend.stop()
        label_studio.stop()


if __name__ == "__main__":
    main()
