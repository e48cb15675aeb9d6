"""What `dtop env` reports: the versions and devices a bug report needs.

The OpenMMLab stack is picky about versions (mmseg 1.2.2 asserts mmcv < 2.2.0; mmcv must be
compiled against the torch beside it), so the report says not only which packages are
installed but whether their compiled parts actually load. Nothing here may raise: a broken
install is exactly when someone runs `dtop env`.
"""

from __future__ import annotations

import importlib
import platform
import sys
from importlib import metadata
from typing import Any


def _dist_version(name: str) -> str:
    """Installed distribution version, or 'not installed' (no import, so it cannot fail)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _module_version(module: str, dist: str) -> str:
    """Version of an importable module; says why when the import itself fails."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - report, never raise
        installed = _dist_version(dist)
        return f"{installed} (import failed: {type(e).__name__}: {_short(e)})"
    return str(getattr(mod, "__version__", _dist_version(dist)))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else ""


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return {"torch": f"not importable ({type(e).__name__}: {_short(e)})", "cuda_available": False,
                "cuda_devices": []}
    devices: list[dict[str, Any]] = []
    available = False
    try:
        available = bool(torch.cuda.is_available())
        if available:
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                devices.append({
                    "index": i,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                })
    except Exception as e:  # noqa: BLE001
        devices.append({"error": f"{type(e).__name__}: {_short(e)}"})
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "cuda_available": available,
        "cuda_devices": devices,
    }


def _mmcv_ops() -> str:
    """Whether mmcv's compiled extension loads, and whether it carries CUDA kernels."""
    try:
        import mmcv.ops  # noqa: F401 - the import is the check
    except Exception as e:  # noqa: BLE001
        return f"not available ({type(e).__name__}: {_short(e)})"
    cuda = "unknown"
    try:
        from mmcv.ops import get_compiling_cuda_version

        v = str(get_compiling_cuda_version())
        cuda = "CPU ops only" if v in ("not available", "", "None") else f"with CUDA {v} kernels"
    except Exception:  # noqa: BLE001, S110 - an mmcv without the helper: say "unknown"
        pass
    return f"compiled ({cuda})"


def collect() -> dict[str, Any]:
    """Versions of python/torch/mmcv/mmseg/mmengine/numpy/dtop and the CUDA devices.

    Values are strings, booleans or lists of small dicts, so the result prints as a table and
    serialises as the one JSON object of `dtop env --json`.
    """
    info: dict[str, Any] = {
        "dtop": _dist_version("dtop"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    info.update(_torch_info())
    info["numpy"] = _module_version("numpy", "numpy")
    info["mmengine"] = _module_version("mmengine", "mmengine")
    info["mmcv"] = _module_version("mmcv", "mmcv")
    info["mmcv_ops"] = _mmcv_ops()
    info["mmseg"] = _module_version("mmseg", "mmsegmentation")
    return info
