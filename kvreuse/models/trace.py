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
