"""Quality benchmark: what naive chunk reuse loses and what the conditioning patch restores.

`task` — the synthetic binding task and its tokenizer; `train` — training of the embedded
reference model; `conditions` — KV of each reuse condition and the measures on it.
"""
