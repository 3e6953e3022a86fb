"""The README's settings table is the list of environment variables the code reads: no more, no fewer."""
import re
from pathlib import Path

from backend.settings import Settings

ROOT = Path(__file__).parents[1]
# os.environ.get("NAME"...), os.environ["NAME"], _env("NAME"...), getenv("NAME"...)
READ = re.compile(r"""(?:environ\.get|environ\[|_env|getenv)\(?\s*["']([A-Z][A-Z0-9_]+)["']""")


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
