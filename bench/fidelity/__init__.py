"""The fidelity benchmark's parts: seeded workloads with gold answers (`workloads`), one request at a
time against a server (`client`), and the comparison of each arm with vLLM alone (`compare`).
`bench/fidelity_bench.py` runs them; `tests/quality/test_fidelity_real.py` reuses them."""
