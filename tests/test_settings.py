"""The README's settings table is the list of environment variables the code reads: no more, no fewer."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backend.settings import Settings

ROOT = Path(__file__).parents[1]
# os.environ.get("NAME"...), os.environ["NAME"], _env("NAME"...), _flag("NAME"...), getenv("NAME"...)
READ = re.compile(r"""(?:environ\.get|environ\[|_env|_flag|_optional_float|getenv)\(?\s*["']([A-Z][A-Z0-9_]+)["']""")


def documented() -> set[str]:
    """The names in the first column of the README's settings tables (``| variable | default | meaning |``)."""
    names, in_table = set(), False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| variable | default | meaning |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table:
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1]))
    return names


def read_by_the_code() -> set[str]:
    files = [p for folder in ("backend", "model", "demo") for p in (ROOT / folder).rglob("*.py")]
    return {name for path in files for name in READ.findall(path.read_text())}


def test_the_settings_table_lists_every_variable_the_code_reads():
    code = read_by_the_code()
    assert set(Settings().to_env()) <= code  # every setting is read from the environment under its own name
    assert code - documented() == set(), "read by the code but missing from README's settings table"
    assert documented() - code == set(), "in README's settings table but read nowhere"


def test_settings_load_no_torch():
    """The container's health check imports the settings every 30 s: that must not import torch."""
    import subprocess
    import sys

    check = "import backend.settings, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    run = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-500:]


@pytest.mark.parametrize("name, value, message", [
    ("DENSE_METHOD", "clearclp", "DENSE_METHOD must be one of clearclip, maskclip"),
    ("PRECISION", "fp16", "PRECISION must be one of auto, bf16, fp32"),
    ("TASK_SCORE", "median", "TASK_SCORE must be one of"),
    ("DEVICE", "gpu", "DEVICE must be cpu, cuda"),
    ("REFINE_BOUNDARIES", "ture", "REFINE_BOUNDARIES must be one of"),
    ("DISTILLATION", "nope", "DISTILLATION must be one of"),
    ("REGION_RECALL_WEIGHT", "0", "REGION_RECALL_WEIGHT must be positive"),
])
def test_settings_with_fixed_values_are_checked_at_startup(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        Settings()


def test_model_defaults_live_in_one_place(monkeypatch):
    from model.config import DEFAULTS

    for name in ("DENSE_METHOD", "INFERENCE_SIZE", "REFINE_BOUNDARIES", "ENSEMBLE_SEEN_WEIGHT", "PRECISION"):
        monkeypatch.delenv(name, raising=False)
    config = Settings().model_config()
    assert (config.dense_method, config.inference_size, config.refine_boundaries, config.seen_weight,
            config.precision) == (DEFAULTS.dense_method, DEFAULTS.inference_size, DEFAULTS.refine_boundaries,
                                  DEFAULTS.seen_weight, DEFAULTS.precision)


def test_redis_and_rq_are_imported_only_by_the_queue_implementation():
    imports = re.compile(r"^\s*(?:import|from)\s+(?:redis|rq)\b", re.MULTILINE)
    importing = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "backend").rglob("*.py") if imports.search(p.read_text()))
    assert importing == ["backend/rq_jobs.py"], importing


def test_the_backend_help_names_the_settings_a_user_sets_first():
    shown = subprocess.run([sys.executable, "-m", "backend", "--help"], capture_output=True, text=True, check=True,
                           cwd=ROOT).stdout
    first = ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR", "CLIP_MODEL", "CLIP_PRETRAINED")
    assert all(name in shown for name in first), shown
    assert set(first) <= set(Settings().to_env())  # the help names real settings
    assert "README" in shown
