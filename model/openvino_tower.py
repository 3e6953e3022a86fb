"""The frozen image tower under OpenVINO (``RUNTIME``): the same pass, in another runtime, on the CPU.

Only the tower runs there. It is the pass's whole cost (ViT-B/16 at 448 px: the tower 414 ms in bf16
eager torch here, the residual decoder 6 ms), and it is frozen: every version of a project shares it,
so it is converted once per model. The decoder a version trained, the classification against the
text embeddings and the ensemble stay in torch, on the tower's outputs: one pass, as before.
Measured on this CPU, tower alone, 448 px, 2 threads: OpenVINO bf16 265 ms against 414 for torch bf16;
converting the tower with the decoder in one graph ran slower than torch (707 ms).

OpenVINO is an optional extra (``pip install -r requirements-openvino.txt``; ``make setup`` installs
it); :func:`resolve_runtime` says which runtime a setting means here. It is always imported through
:func:`openvino_module`, without its telemetry.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from model.config import OPENVINO_MISSING, RUNTIMES, openvino_installed
from model.dense import TowerOutput


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """``"torch"`` or ``"openvino"``: ``"auto"`` means OpenVINO on the CPU where it is installed.

    Raises:
        ValueError: an unknown runtime, or OpenVINO asked for where it cannot run (the message says what to do).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"RUNTIME must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "openvino":
        if device.type != "cpu":
            raise ValueError(f"RUNTIME=openvino runs on the CPU; DEVICE is {device}: set RUNTIME=torch or auto")
        if not openvino_installed():
            raise ValueError(OPENVINO_MISSING)
    if runtime == "auto":
        return "openvino" if device.type == "cpu" and openvino_installed() else "torch"
    return runtime


def openvino_module():
    """The ``openvino`` package, imported with its telemetry blocked.

    openvino depends on openvino-telemetry, which sends usage events to Google Analytics (``import openvino``
    and every ``convert_model``) unless a consent file under ``~/intel`` declines. This backend sends nothing
    anywhere. Each event also forks a process off this multithreaded one to make the request; a child forked
    while another thread held a lock hangs, ignores SIGTERM (it inherited the service's handler), and the
    process's exit then waits on it for good. Where the telemetry package can't be imported, openvino uses its
    own stub, which sends nothing.
    """
    sys.modules.setdefault("openvino_telemetry", None)  # None: `import openvino_telemetry` raises ImportError
    import openvino

    return openvino


def compile_for_cpu(graph, bf16: bool):
    """An OpenVINO graph compiled for this CPU, in bfloat16 or float32, on as many threads as torch uses."""
    ov = openvino_module()
    return ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
                                                 "INFERENCE_NUM_THREADS": torch.get_num_threads()})


class _Outputs(nn.Module):
    """The tower's :class:`TowerOutput` as a flat tuple, which a traced graph returns."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.tower(images)
        return out.dense, *out.features, out.image


class OpenVinoTower:
    """A frozen dense tower (:mod:`model.dense`) compiled by OpenVINO for any batch and input size; called
    like the tower: images (B, 3, H, W) normalised, H and W multiples of ``stride`` → :class:`TowerOutput`.

    ``bf16``: OpenVINO's bfloat16 inference precision (where the CPU runs bfloat16 faster), else float32.
    """

    def __init__(self, tower: nn.Module, bf16: bool):
        ov = openvino_module()
        self.stride = tower.stride
        # Traced once at a size off the CLIP's own grid, so the graph keeps the position-embedding resize.
        side = self.stride * (getattr(getattr(tower, "visual", None), "grid_size", (14, 14))[0] + 1)
        with torch.no_grad():
            graph = ov.convert_model(_Outputs(tower).eval(), example_input=torch.zeros(1, 3, side, side),
                                     input=[ov.PartialShape([-1, 3, -1, -1])])
        self.compiled = compile_for_cpu(graph, bf16)

    def __call__(self, images: torch.Tensor) -> TowerOutput:
        outputs = self.compiled.create_infer_request().infer({0: images.detach().float().cpu().numpy()})
        dense, *features, image = (torch.from_numpy(outputs[port].copy()) for port in self.compiled.outputs)
        return TowerOutput(dense=dense, features=features, image=image)
