"""Where models train and score: ``--device auto|cpu|cuda|cuda:K``.

The runner, the validation and the gradient methods move the model (``model.to(device)``) and
every example tensor (`Examples.to`) to the device, and bring losses, gradients' results and
checkpoints back to the CPU. A `Task` needs nothing special for this, except that tensors it
creates inside ``example_losses`` or ``forward`` must follow its inputs (``device=x.device``).

An unavailable device is an error, never a silent fall-back to the CPU (``auto`` is the only
spec that chooses). Inside a worker pool (`simfluence.backends`) plain ``cuda`` means the GPU
``slot % device_count``, so ``--workers 4 --device cuda`` on a 4-GPU machine trains one run per
GPU; under Ray, each task sees only the GPU Ray gave it.

Determinism: on the CPU the same threads give bit-identical losses; CUDA kernels are
deterministic only where PyTorch makes them so (`torch.use_deterministic_algorithms`), so GPU
recordings repeat to rounding, not to the bit.
"""

from __future__ import annotations

import torch

from simfluence.backends import worker_slot
from simfluence.errors import SimfluenceError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:K"


class DeviceError(SimfluenceError):
    """The requested device does not exist on this machine (or the spec is malformed)."""


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """The `torch.device` for a spec: None or ``cpu``; ``auto`` (a GPU when there is one);
    ``cuda`` (in a worker pool: GPU ``slot % count``); ``cuda:K``.

    Raises `DeviceError` naming the spec when it is malformed or the device is not available.
    """
    if spec is None:
        return torch.device("cpu")
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = spec.strip().lower()
    if text == "auto":
        return resolve_device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise DeviceError(f"--device {spec!r}: use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {spec}: no CUDA GPU is available here (torch {torch.__version__}); "
            "use --device cpu or auto"
        )
    count = torch.cuda.device_count()
    if not index:
        slot = worker_slot()
        return torch.device("cuda", 0 if slot is None else slot % count)
    if int(index) >= count:
        raise DeviceError(f"--device {spec}: this machine has {count} GPU(s), cuda:0..{count - 1}")
    return torch.device("cuda", int(index))


def device_label(device: torch.device) -> str:
    """What a run's metadata records: ``cpu``, or ``cuda:K (<GPU name>)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)
