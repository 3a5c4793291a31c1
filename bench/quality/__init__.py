"""Quality benchmark harness (not installed with kvreuse): what naive chunk reuse loses and what
the conditioning patch restores.

`task` — the synthetic binding task and its tokenizer; `construct` and `train` — the embedded
reference model ("binder"); `conditions` — KV of each reuse condition and the measures on it;
`server` — the same conditions through a running `kvreuse serve`.
"""
