"""kvreuse's background threads leave the worker's OpenMP cores (`kvreuse.threads`).

A thread that calls `enter_background` runs on the CPUs set with `set_background_cpus` (Linux:
per thread), and the thread that started it keeps its own; the CPUs come from vLLM's own binding
(`OMPProcessManager`): its reserved CPUs, never a worker's.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvreuse import threads
from kvreuse.models import TinySpec, build_tiny_model

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread affinity is Linux's")


@pytest.fixture(autouse=True)
def _reset():
    yield
    threads.set_background_cpus(None)


@linux
def test_background_threads_move_and_the_starter_stays():
    mine = os.sched_getaffinity(0)
    one = {min(mine)}
    threads.set_background_cpus(one)
    seen = {}

    def body():
        threads.enter_background()
        seen["cpus"] = os.sched_getaffinity(0)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen["cpus"] == one
    assert os.sched_getaffinity(0) == mine
    with ThreadPoolExecutor(1, initializer=threads.enter_background) as pool:  # as the copy / load pools do
        assert pool.submit(os.sched_getaffinity, 0).result() == one
    threads.set_background_cpus(None)  # nothing set: threads stay where they start
    with ThreadPoolExecutor(1, initializer=threads.enter_background) as pool:
        assert pool.submit(os.sched_getaffinity, 0).result() == mine


@linux
def test_vllm_binding_gives_the_reserved_cpus(tmp_path, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    d = build_tiny_model(tmp_path / "m", TinySpec(num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1,
                                                  head_dim=32))
    cfg = EngineArgs(model=str(d), dtype="float32", enforce_eager=True, max_model_len=256).create_engine_config()
    cpus = sorted(os.sched_getaffinity(os.getppid()))
    if len(cpus) < 2:
        pytest.skip("one CPU: nothing to move to")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", str(cpus[0]))  # the worker on the first CPU, as vLLM binds it
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    got = threads.vllm_background_cpus(cfg)
    assert got and cpus[0] not in got and got <= set(cpus)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # no binding: threads stay
    assert threads.vllm_background_cpus(cfg) is None
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))  # workers on every CPU: none left
    assert threads.vllm_background_cpus(cfg) is None


def test_the_environment_chooses_the_cpus():
    assert threads.configured_background_cpus(None, "off") is None
    assert threads.configured_background_cpus(None, "1,3") == {1, 3}
    assert threads.configured_background_cpus(None, "2-4, 7") == {2, 3, 4, 7}
    with pytest.raises(ValueError, match="KVREUSE_BACKGROUND_CPUS"):
        threads.configured_background_cpus(None, "one")


@linux
def test_a_moved_thread_keeps_its_priority_one_left_with_the_forward_yields(monkeypatch):
    monkeypatch.delenv("KVREUSE_BACKGROUND_NICE", raising=False)
    base = os.getpriority(os.PRIO_PROCESS, 0)

    def prio_after(nice):
        out = {}

        def body():
            threads.enter_background(nice)
            out["p"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        t = threading.Thread(target=body)
        t.start()
        t.join()
        return out["p"]

    threads.set_background_cpus({min(os.sched_getaffinity(0))})
    assert prio_after(5) == base                 # on CPUs of its own: no lower priority (GIL inversion)
    threads.set_background_cpus(None)
    assert prio_after(5) == min(base + 5, 19)    # sharing the forward's cores: the forward wins them


_PROBE = r"""
import threading
from concurrent.futures import ThreadPoolExecutor
import torch
try:
    import sentencepiece  # noqa: F401  (bundles a libgomp of its own: the one PyTorch reads must be found)
except ImportError:
    pass
from kvreuse import threads

torch.set_num_threads(2)
torch.ones(1 << 20).exp_()
seen = {}

def body(serial):
    if serial:
        threads.enter_background()
    torch.ones(1 << 20).exp_()
    seen[serial] = torch.get_num_threads()

for serial in (True, False):
    t = threading.Thread(target=body, args=(serial,))
    t.start()
    t.join()
with ThreadPoolExecutor(1, initializer=threads.enter_background) as pool:  # as the copy / load pools do
    seen["pool"] = pool.submit(torch.get_num_threads).result()
seen["main"] = torch.get_num_threads()
print(seen)
"""


@linux
def test_background_threads_run_torch_ops_serially():
    """A background thread's PyTorch ops run on it alone (PyTorch runs an op in parallel only where the calling
    thread's OpenMP count is over 1): with the GNU runtime every thread that opens a parallel region gets a
    team of its own, and past as many team threads as CPUs, every team sleeps between regions, the
    forward's included.  The thread that started it keeps its own count.  In a fresh process (PyTorch's
    thread count is process state)."""
    import ast
    import subprocess

    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr[-2000:]
    seen = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert seen == {True: 1, False: 2, "pool": 1, "main": 2}, seen  # False: what an ordinary thread gets
