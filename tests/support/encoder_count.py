"""Count vision-encoder runs inside a vLLM server, independently of kvreuse's own metrics.

Test and benchmark support only; nothing of this is installed with kvreuse.

    argv += encoder_count_args()                 # --worker-extension-cls tests.support.encoder_count.EncoderRunLog
    env.update(encoder_count_env(log_path))      # KVREUSE_TEST_ENCODER_LOG=log_path, repo root on PYTHONPATH
    ... requests ...
    encoded_items(log_path, "image")             # items the model's vision encoder has encoded so far

vLLM imports a `--worker-extension-cls` by qualified name in every worker process, before the model
runs; importing this module there wraps `embed_multimodal` of the Qwen2-VL family so that each call
appends `modality count` lines (the items it encoded) to the log.  The extension class itself adds
nothing to the worker.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

ENV = "KVREUSE_TEST_ENCODER_LOG"
ROOT = Path(__file__).resolve().parents[2]
_MODELS = (("vllm.model_executor.models.qwen2_vl", "Qwen2VLForConditionalGeneration"),
           ("vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"))


class EncoderRunLog:
    """vLLM worker extension whose only effect is importing this module in the worker process."""


def encoder_count_args() -> list[str]:
    """vLLM server arguments that load the hook in the server's worker process."""
    return ["--worker-extension-cls", f"{__name__}.{EncoderRunLog.__name__}"]


def encoder_count_env(log: str | os.PathLike) -> dict[str, str]:
    """Environment for the server process: where to log, and this repository importable."""
    path = os.environ.get("PYTHONPATH", "")
    return {ENV: str(log), "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def encoded_items(log: str | os.PathLike, modality: str = "image") -> int:
    """Items of `modality` the vision encoder has encoded so far, read from the hook's log."""
    return sum(int(line.split()[1]) for line in Path(log).read_text().splitlines() if line.startswith(modality))


def _items(grid) -> int:
    # grid: a [num_items, 3] tensor of (t, h, w), or a list of such tensors / per-item rows
    if isinstance(grid, (list, tuple)):
        return sum(len(g) if getattr(g, "dim", lambda: 1)() > 1 else 1 for g in grid)
    return len(grid)


def _wrap(orig, path: str):
    @functools.wraps(orig)
    def embed_multimodal(self, **kwargs):
        lines = [f"{modality} {_items(kwargs[key])}\n"
                 for key, modality in (("image_grid_thw", "image"), ("video_grid_thw", "video"))
                 if kwargs.get(key) is not None]
        with open(path, "a") as f:
            f.writelines(lines)
        return orig(self, **kwargs)

    embed_multimodal._kvreuse_counted = True
    return embed_multimodal


def _install(path: str) -> None:
    for module, name in _MODELS:
        cls = getattr(importlib.import_module(module), name)
        if not getattr(cls.embed_multimodal, "_kvreuse_counted", False):
            cls.embed_multimodal = _wrap(cls.embed_multimodal, path)


if os.environ.get(ENV):  # in the server's worker process (the test process only calls the helpers above)
    _install(os.environ[ENV])
