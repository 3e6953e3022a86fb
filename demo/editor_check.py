"""The README's click flow in Label Studio's real editor (headless Chromium), on ``make demo``'s
"Clicks and boxes" project: what an annotator meets, step by step, with screenshots.

    make demo                                            # in one terminal
    python -m demo.editor_check --token <its API token>  # in another

For each task it opens the task as an annotator does (the pre-label is there as regions), with
Auto-Annotation on. For the labels whose pre-label is worst it picks the smart tool (the toolbar's
Auto-Detect button) and the label in the key-point row, then makes the click simulator's clicks
(``bench.interactive.next_click`` on the label's region as the editor holds it) with Ctrl held, so a
click on a pre-label region places a key point instead of selecting the region (Ctrl+Alt: negative),
until IoU 0.9 or ``--clicks``. Then, on the next worst ``--boxes`` labels, it picks the smart rectangle
(the smart button's second press) and drags a box around the label's largest part, with Ctrl held as
for the clicks. Each suggestion is accepted with its ✓ on the canvas, zooming out where that ✓ lies
under the image. It prints each step's IoU with the ground truth and the regions per label, and saves
screenshots to ``--shots``. Needs Debian's ``chromium`` and ``chromium-driver`` and selenium
(``requirements-dev.txt``).
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np

from backend.control_tags import BrushLabels
from bench.interactive import iou, largest_part, next_click
from demo import world
from demo.__main__ import SCENE_NAME

ROOT = Path(__file__).resolve().parents[1]
SELECTED_TOOL = ("const t = Htx.annotationStore.selected.names.get('image').getToolsManager().findSelectedTool();"
                 "return t ? t.fullName : null")
SMART_TOOLS = {"click": "KeyPointTool-dynamic", "box": "RectangleTool-dynamic"}  # the demo's tags, in config order
# The image's place on the stage: its size at zoom 1, the zoom and the offset of its top-left corner.
VIEW = ("const i = Htx.annotationStore.selected.names.get('image');"
        "return [i.stageWidth, i.stageHeight, i.zoomScale, i.zoomingPositionX, i.zoomingPositionY]")


class Editor:
    """One headless Chromium logged into Label Studio, driving its labeling view."""

    def __init__(self, url: str, username: str, password: str, shots: Path):
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError:
            raise SystemExit("editor check: needs selenium (pip install selenium) and Debian's chromium and "
                             "chromium-driver (apt-get install chromium chromium-driver)") from None
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1500"):
            options.add_argument(argument)
        self.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        self.url, self.shots = url, shots
        shots.mkdir(parents=True, exist_ok=True)
        self._login(username, password)

    def _login(self, username: str, password: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        self.driver.get(f"{self.url}/user/login/")
        self.driver.find_element(By.NAME, "email").send_keys(username)
        self.driver.find_element(By.NAME, "password").send_keys(password, Keys.ENTER)
        time.sleep(2)
        # The bottom bar's Auto-Annotation switch, as an annotator leaves it on (the editor keeps it here).
        self.js("localStorage.setItem('autoAnnotation', 'true')")

    def js(self, code: str, *arguments):
        return self.driver.execute_script(code, *arguments)

    def wait(self, code: str, timeout: float = 30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = self.js(code)
                if value:
                    return value
            except Exception:  # noqa: BLE001 (the editor is still loading)
                pass
            time.sleep(0.3)
        return None

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def open_task(self, project: int, task: int) -> None:
        self.driver.get(f"{self.url}/projects/{project}/data?task={task}")
        if not self.wait("return Htx.annotationStore.selected.names.get('image').stageWidth > 0", 90):
            raise RuntimeError(f"task {task}: the labeling view did not load")
        time.sleep(1.5)

    def results(self) -> list[dict]:
        return self.js("return Htx.annotationStore.selected.serializeAnnotation()")

    def regions_per_label(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for result in self.results():
            if result["type"] == "brushlabels":
                label = result["value"]["brushlabels"][0]
                counts[label] = counts.get(label, 0) + 1
        return counts

    def mask(self, label: str, shape: tuple[int, int]) -> np.ndarray:
        """The union of the annotation's brush regions of ``label``, as the editor holds them now."""
        mask = np.zeros(shape, bool)
        for result in self.results():
            if result["type"] == "brushlabels" and result["value"]["brushlabels"] == [label]:
                mask |= BrushLabels.mask(result, *shape)
        return mask

    def pick(self, label: str, tag: str = "click") -> str | None:
        """The smart tool of ``tag`` (the toolbar's smart button: its first press picks the smart key point, the
        second the smart rectangle), then ``label`` of that tag; the tool chosen."""
        from selenium.webdriver.common.by import By
        tool = SMART_TOOLS[tag]
        for _ in range(3):
            if self.js(SELECTED_TOOL) == tool:
                break
            self.driver.find_element(By.CSS_SELECTOR, "button.lsf-tool_smart").click()
            time.sleep(0.4)
        if label not in self.js(f"return Htx.annotationStore.selected.names.get('{tag}').selectedLabels"
                                ".map(l => l.value)"):
            chips = [e for e in self.driver.find_elements(
                By.XPATH, f"//span[contains(@class, 'label__text') and normalize-space(text())='{label}']")
                if e.is_displayed()]
            chip = chips[list(SMART_TOOLS).index(tag) + 1]  # the tags' label rows in config order: brush, key point, box
            self.js("arguments[0].scrollIntoView({block: 'center'})", chip)
            time.sleep(0.3)
            chip.click()
            time.sleep(0.4)
        return self.js(SELECTED_TOOL)

    def _on_stage(self, x: float, y: float, natural: tuple[int, int]) -> tuple[int, int]:
        """Image pixel (x, y) as an offset from the stage's centre, kept inside the stage: the editor may show
        the image a little zoomed in, its outermost pixels out of reach."""
        from selenium.webdriver.common.by import By
        stage = self.driver.find_element(By.CSS_SELECTOR, ".konvajs-content").size
        width, height, zoom, left, top = self.js(VIEW)
        return (int(min(max(x / natural[1] * width * zoom + left, 2), stage["width"] - 3) - stage["width"] / 2),
                int(min(max(y / natural[0] * height * zoom + top, 2), stage["height"] - 3) - stage["height"] / 2))

    def click(self, x: float, y: float, positive: bool, natural: tuple[int, int]) -> bool:
        """A Ctrl-click (and Alt for a negative one) at image pixel (x, y); whether a suggestion came back."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        stage = self.driver.find_element(By.CSS_SELECTOR, ".konvajs-content")
        keys = [Keys.CONTROL] + ([] if positive else [Keys.ALT])
        chain = ActionChains(self.driver).move_to_element_with_offset(stage, *self._on_stage(x, y, natural))
        for key in keys:
            chain = chain.key_down(key)
        chain = chain.click()
        for key in keys:
            chain = chain.key_up(key)
        chain.perform()
        return self._suggested()

    def drag(self, box: tuple[float, float, float, float], natural: tuple[int, int]) -> bool:
        """A Ctrl-drag from the box's top-left image pixel to its bottom-right (left, top, right, bottom);
        whether a suggestion came back. Without Ctrl the drag also selects the pre-label's region under its start,
        and the ✓ then gives the suggestion that region's label."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        stage = self.driver.find_element(By.CSS_SELECTOR, ".konvajs-content")
        start, end = self._on_stage(*box[:2], natural), self._on_stage(*box[2:], natural)
        chain = (ActionChains(self.driver).move_to_element_with_offset(stage, *start).key_down(Keys.CONTROL)
                 .click_and_hold().pause(0.2))
        for share in (0.25, 0.5, 0.75, 1.0):  # the editor draws the rectangle as the pointer moves
            chain = chain.move_to_element_with_offset(stage, int(start[0] + share * (end[0] - start[0])),
                                                      int(start[1] + share * (end[1] - start[1]))).pause(0.05)
        chain.release().key_up(Keys.CONTROL).perform()
        return self._suggested()

    def _suggested(self) -> bool:
        found = self.wait("return Htx.annotationStore.selected.suggestions.size > 0", 30)
        time.sleep(0.8)
        return bool(found)

    def accept(self) -> str:
        """Accept the suggestion with its ✓ on the canvas, which keeps the clicks (the bottom bar's ✓ accepts all
        and deletes them, so the next click would be answered alone); how it was reached."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        stage = self.driver.find_element(By.CSS_SELECTOR, ".konvajs-content")
        # SuggestionControls: a 64×32 pill under the suggested region, ✗ on its left half and ✓ on its right.
        pill_js = ("for (const stage of Konva.stages) for (const group of stage.find('Group'))"
                   "  if (group.width() === 64 && group.height() === 32) return group.getClientRect();"
                   "return null;")
        zoomed = 0
        pill = self.js(pill_js)
        while pill and pill["y"] + pill["height"] > stage.size["height"] and zoomed < 3:
            # Under a region that reaches the image's bottom edge the pill lies below the image: zoom out.
            self.driver.find_element(By.CSS_SELECTOR, "button[aria-label='zoom-out']").click()
            zoomed += 1
            time.sleep(0.5)
            pill = self.js(pill_js)
        if not pill:
            raise RuntimeError("no suggestion to accept")
        x = pill["x"] + 0.75 * pill["width"] - stage.size["width"] / 2
        y = pill["y"] + pill["height"] / 2 - stage.size["height"] / 2
        ActionChains(self.driver).move_to_element_with_offset(stage, int(x), int(y)).pause(0.3).click().perform()
        time.sleep(1.0)
        for _ in range(zoomed):
            self.driver.find_element(By.CSS_SELECTOR, "button[aria-label='zoom-in']").click()
            time.sleep(0.3)
        return f"canvas ✓{f' after zooming out {zoomed}×' if zoomed else ''}"

    def close(self) -> None:
        self.driver.quit()


def check_label(editor: Editor, prefix: str, label: str, target: np.ndarray, clicks: int) -> list[dict]:
    """Clicks on one label until its region reaches IoU 0.9 (the simulator's protocol) or ``clicks``, each
    suggestion accepted; one row per step."""
    rows = [{"step": "opened", "IoU": iou(editor.mask(label, target.shape), target),
             "regions": editor.regions_per_label(), "shot": editor.shot(f"{prefix}-0-opened").name}]
    for k in range(1, clicks + 1):
        if rows[-1]["IoU"] >= 0.9:
            break
        tool = editor.pick(label)  # the editor drops the label after each region it creates
        x, y, positive = next_click(target, editor.mask(label, target.shape))
        suggested = editor.click(x, y, positive, target.shape)
        shot = editor.shot(f"{prefix}-{k}a-suggestion").name
        how = editor.accept() if suggested else "no suggestion"
        rows.append({"step": f"click {k} ({'+' if positive else '−'}, {tool}), {how}", "suggested": suggested,
                     "IoU": iou(editor.mask(label, target.shape), target), "regions": editor.regions_per_label(),
                     "shot": shot + ", " + editor.shot(f"{prefix}-{k}b-accepted").name})
    return rows


def check_box(editor: Editor, prefix: str, label: str, target: np.ndarray) -> list[dict]:
    """One box around the label's largest part, its suggestion accepted; the rows as :func:`check_label`'s."""
    rows = [{"step": "opened", "IoU": iou(editor.mask(label, target.shape), target),
             "regions": editor.regions_per_label(), "shot": editor.shot(f"{prefix}-0-opened").name}]
    tool = editor.pick(label, "box")
    suggested = editor.drag(largest_part(target)[1], target.shape)
    shot = editor.shot(f"{prefix}-1a-suggestion").name
    how = editor.accept() if suggested else "no suggestion"
    rows.append({"step": f"box ({tool}), {how}", "suggested": suggested, "IoU": iou(editor.mask(label, target.shape), target),
                 "regions": editor.regions_per_label(), "shot": shot + ", " + editor.shot(f"{prefix}-1b-accepted").name})
    return rows


def check_task(editor: Editor, project: int, task: dict, truth: np.ndarray, labels: int, clicks: int,
               boxes: int = 0) -> list[list]:
    """The flow on one task, for its ``labels`` labels (of 1 % of the image or more) whose pre-label is
    worst, below IoU 0.9, then one box on each of the next ``boxes`` such labels."""
    editor.open_task(project, task["id"])
    opened = {c: iou(editor.mask(world.NAMES[c], truth.shape), truth == c)
              for c in np.unique(truth) if c < len(world.NAMES) and (truth == c).mean() >= 0.01}
    worst = [c for c in sorted(opened, key=opened.get) if opened[c] < 0.9]
    print(f"\ntask {task['id']}:", flush=True)
    steps = []
    for index, c in enumerate(worst[:labels + boxes]):
        prefix = f"task{task['id']}-{world.NAMES[c]}"
        rows = (check_label(editor, prefix, world.NAMES[c], truth == c, clicks) if index < labels
                else check_box(editor, prefix + "-box", world.NAMES[c], truth == c))
        print(f"  {world.NAMES[c]!r}:")
        for row in rows:
            print(f"    {row['step']}: IoU {row['IoU']:.2f}, regions per label {row['regions']}  [{row['shot']}]",
                  flush=True)
        steps.append(rows)
    return steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.editor_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--project", type=int, default=2, help="make demo's 'Clicks and boxes' project")
    parser.add_argument("--username", default="admin@example.com")
    parser.add_argument("--password", default="demo-password")
    parser.add_argument("--token", required=True, help="the API token make demo printed")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--labels", type=int, default=3, help="labels clicked per task, worst pre-label first")
    parser.add_argument("--clicks", type=int, default=3, help="the most clicks per label")
    parser.add_argument("--boxes", type=int, default=1, help="labels boxed per task, after the clicked ones")
    parser.add_argument("--images", type=int, default=24, help="the demo's --images (the scenes' draw)")
    parser.add_argument("--shots", type=Path, default=ROOT / ".demo" / "editor-shots")
    args = parser.parse_args(argv)
    scenes = world.test_scenes(args.images)
    editor = Editor(args.url, args.username, args.password, args.shots)
    try:
        from demo.labelstudio import LabelStudio
        label_studio = LabelStudio(ROOT / ".demo" / "label-studio", token=args.token)
        label_studio.url = args.url
        labels = []
        for task in label_studio.tasks(args.project)[:args.tasks]:
            _, truth = scenes[int(re.search(SCENE_NAME, task["data"]["image"]).group(1))]
            labels += check_task(editor, args.project, task, truth, args.labels, args.clicks, args.boxes)
    finally:
        editor.close()
    boxed = [rows for rows in labels if rows[-1]["step"].startswith("box")]
    labels = [rows for rows in labels if not rows[-1]["step"].startswith("box")]
    steps = [row for rows in labels for row in rows[1:]]
    if boxed:
        print(f"\n{len(boxed)} boxes: a suggestion for {sum(rows[1]['suggested'] for rows in boxed)}; IoU "
              f"{np.mean([rows[0]['IoU'] for rows in boxed]):.2f} as opened, {np.mean([rows[1]['IoU'] for rows in boxed]):.2f} "
              f"after; most brush regions of one label after: {max(max(rows[1]['regions'].values()) for rows in boxed)}")
    print(f"\n{len(labels)} labels on {args.tasks} tasks, {len(steps)} clicks: a suggestion for "
          f"{sum(row['suggested'] for row in steps)}; IoU {np.mean([rows[0]['IoU'] for rows in labels]):.2f} as "
          f"opened, {np.mean([rows[-1]['IoU'] for rows in labels]):.2f} after the clicks; most brush regions of one "
          f"label after {sum(row['suggested'] for row in steps)} accepts: "
          f"{max(max(rows[-1]['regions'].values()) for rows in labels)}; screenshots in {args.shots}")


if __name__ == "__main__":
    main()
