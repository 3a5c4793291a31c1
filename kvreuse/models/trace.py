"""The sliding-window agent trace used by the tests, `make demo` and `bench/ttft_bench.py`.

Each turn: a system prompt, a window of the last `window` "frames" (tool outputs / observations,
one message each: the oldest dropped and a new one added every turn), and a new question.  Text
is made of the tiny vocabulary's words, so every word is one token.
"""

from __future__ import annotations

import random

from kvreuse.models.tiny import tiny_words


def agent_trace(turns: int = 5, *, window: int = 5, frame_words: int = 96, system_words: int = 48,
                question_words: int = 12, seed: int = 0, vocab_size: int = 512) -> list[list[dict[str, str]]]:
    """Chat messages of each turn."""
    rng = random.Random(seed)
    words = tiny_words(vocab_size)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    system = {"role": "system", "content": text(system_words)}
    frames = [text(frame_words) for _ in range(window + turns)]
    out = []
    for t in range(turns):
        win = frames[t:t + window]
        msgs = [system] + [{"role": "tool", "content": f} for f in win]
        msgs.append({"role": "user", "content": text(question_words)})
        out.append(msgs)
    return out


def image_data_url(seed: int, size: tuple[int, int] = (112, 112), fmt: str = "PNG") -> str:
    """A deterministic random RGB picture (a stand-in screenshot) as a `data:` URL."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def screenshot_trace(turns: int = 5, *, window: int = 4, system_words: int = 24, caption_words: int = 6,
                     question_words: int = 8, seed: int = 0, vocab_size: int = 512,
                     words: list[str] | None = None, size: tuple[int, int] = (112, 112),
                     uuids: bool = False) -> list[dict]:
    """A GUI agent's turns: a system prompt, the last `window` screenshots (one user message each:
    the picture and a short caption; the oldest dropped and a new one added every turn) and a question.

    Each turn is `{"messages": [...], "shots": [ids in the window], "new": id of the newest}`;
    screenshot `i` is `image_data_url(seed * 1000 + i)`, so a shot is the same data: URL every time it is
    re-sent.  `uuids=True` also sends `uuid: "shot-<i>"` with each picture (client-supplied identity).
    """
    rng = random.Random(seed)
    words = words or tiny_words(vocab_size)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    system = {"role": "system", "content": text(system_words)}
    captions = [text(caption_words) for _ in range(window + turns)]

    def shot(i: int) -> dict:
        part = {"type": "image_url", "image_url": {"url": image_data_url(seed * 1000 + i, size)}}
        if uuids:
            part["uuid"] = f"shot-{seed}-{i}"
        return {"role": "user", "content": [part, {"type": "text", "text": captions[i]}]}

    out = []
    for t in range(turns):
        ids = list(range(t, t + window))
        msgs = [system] + [shot(i) for i in ids] + [{"role": "user", "content": text(question_words)}]
        out.append({"messages": msgs, "shots": ids, "new": ids[-1] if t else None})
    return out


def video_data_url(seed: int, frames: int = 8, size: int = 112, fps: float = 1.0) -> str:
    """A deterministic random clip (mp4v in an .mp4, written with OpenCV) as a `data:` URL.

    At `fps=1` Qwen2.5-VL's `second_per_grid_ts` is 2 s (temporal patch 2), so with the tiny
    checkpoint's `tokens_per_second=2` consecutive frame groups sit 4 temporal positions apart."""
    import base64
    import os
    import tempfile

    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
        for _ in range(frames):
            w.write(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        w.release()
        with open(path, "rb") as f:
            data = f.read()
    finally:
        os.remove(path)
    return "data:video/mp4;base64," + base64.b64encode(data).decode()
