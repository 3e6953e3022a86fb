"""What the backend knows of each project: its label config, whether Label Studio set it up, its training.

Only projects whose ``/setup`` the backend has seen (Label Studio sends it when the model is connected)
get work nobody may have asked for: training jobs, and /predict handovers to the queue's workers.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from backend.credentials import Credentials
from backend.jobs import TrainingJobs
from backend.settings import Settings
from backend.store import Store

log = logging.getLogger(__name__)

MAX_REMEMBERED_CONFIGS = 4096  # projects whose label config's digest is kept, to skip rewriting it


@dataclass
class Projects:
    settings: Settings
    store: Store
    credentials: Credentials
    jobs: TrainingJobs
    _configs: dict[str, str] = field(default_factory=dict)  # project → digest of the config last stored (bounded)

    def remember_config(self, project: str, label_config: str) -> None:
        """Store a project's label config, once it has been parsed (bounded and valid)."""
        digest = hashlib.sha256(label_config.encode()).hexdigest()
        if project and label_config and self._configs.get(project) != digest:
            self.store.set_label_config(project, label_config)
            self._configs.pop(project, None)
            self._configs[project] = digest
            while len(self._configs) > MAX_REMEMBERED_CONFIGS:
                del self._configs[next(iter(self._configs))]

    def set_up(self, project: str, label_config: str) -> None:
        """Label Studio's /setup named this project, with this (parsed) label config."""
        self.remember_config(project, label_config)
        if project:
            self.store.mark_set_up(project)

    def is_set_up(self, project: str) -> bool:
        return bool(project) and self.store.is_set_up(project)

    def train(self, project: str, pull: bool) -> str:
        """Ask for a training job for a set-up project; ``pull``: its annotations come from Label Studio's API
        when a token for it is known."""
        if not self.is_set_up(project):
            return (f"refused: project {project} was never set up (Label Studio's /setup, when the model is "
                    "connected, comes first)")
        env = self.credentials.training_env(project)
        return self.jobs.request(project, pull=pull and bool(env or self.settings.label_studio_url), env=env)
