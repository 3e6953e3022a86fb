"""Every command answers --help with its usage, and does nothing else (no server, no download, no file)."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
COMMANDS = ["backend", "backend check", "backend.training", "backend.prelabel", "backend.worker", "demo", "demo.train_clip", "bench.postprocess",
            "bench.speed", "bench.prelabel_quality", "bench.interactive", "bench.accuracy", "bench.calibration", "bench.active_learning",
            "bench.queue", "bench.attack", "bench.precision", "bench.gpu", "bench.throughput",
            "bench.partial_labels"]


def test_every_command_answers_help_without_side_effects(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "MODEL_DIR": str(tmp_path / "model_dir"),
           "GKC_CACHE": str(tmp_path / "cache"), "NLTK_DATA": str(tmp_path / "nltk"), "HF_HOME": str(tmp_path / "hf"),
           "PORT": "1"}  # were a server to start, it could not take a real port

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *command.split(), "--help"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(COMMANDS, pool.map(run, COMMANDS), strict=True))
    for command, result in results.items():
        assert result.returncode == 0, (command, result.stderr[-1000:])
        assert result.stdout.startswith(f"usage: python -m {command}"), (command, result.stdout[:200])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["home"], "a --help wrote files"


def test_the_serving_commands_start_without_the_sdks_converter():
    """label-studio-sdk's converter imports nltk and scipy.stats (1.5 s of a 7 s start here): the backend, its
    workers and its commands load it only when they read a brush annotation."""
    modules = ["backend.__main__", "backend.worker", "backend.prelabel", "backend.training"]
    probe = (f"import sys, {', '.join(modules)}; "
             "print(sorted(n for n in sys.modules if n.startswith(('label_studio_sdk.converter', 'nltk'))))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(("flags", "why"), [(["--queue", "--annotate-next", "20"], "without --queue"),
                                            (["--annotate-next", "-1"], "0 to stop ordering")])
def test_prelabel_refuses_an_order_it_cannot_make(flags, why):
    result = subprocess.run([sys.executable, "-m", "backend.prelabel", "--url", "http://127.0.0.1:1", "--token", "t",
                             "--project", "1", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--annotate-next" in result.stderr and why in result.stderr


def test_the_gpu_benchmark_runs_on_the_cpu_with_quick():
    result = subprocess.run([sys.executable, "-m", "bench.gpu", "--quick"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = result.stdout.splitlines()[-1].split()
    assert summary[:2] == ["gpu:", "device=cpu"], result.stdout[-1000:]
    figures = dict(item.split("=") for item in summary[1:])
    assert all(float(figures[key]) > 0 for key in ("predict_ms", "images_per_s", "large_over_bare", "train_steps_per_s"))


def test_the_prelabel_throughput_benchmark_prelabels_every_task_over_http():
    from demo.train_clip import DEMO_CLIP

    result = subprocess.run([sys.executable, "-m", "bench.throughput", "--model", str(DEMO_CLIP.config), "--size", "128",
                             "--images", "3", "--batch", "2", "--photo", "320x180"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]  # it checks that every task was predicted and uploaded
    summary = result.stdout.splitlines()[-1].split()
    assert summary[0] == "throughput:", result.stdout[-1000:]
    rates = dict(item.split("=") for item in summary[1:])
    assert set(rates) == {"fp32_torch", "auto_auto"} and all(float(rate) > 0 for rate in rates.values())


def test_the_demo_suggests_an_active_learning_batch_as_large_as_its_training_trigger(monkeypatch):
    from demo.__main__ import ANNOTATE_NEXT_BATCH, annotate_next_batch

    monkeypatch.delenv("TRAIN_AFTER_ANNOTATIONS", raising=False)
    assert annotate_next_batch() == ANNOTATE_NEXT_BATCH
    monkeypatch.setenv("TRAIN_AFTER_ANNOTATIONS", "5")
    assert annotate_next_batch() == 5  # each batch's last submit then starts the job that renews the order
