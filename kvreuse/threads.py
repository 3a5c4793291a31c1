"""Where kvreuse's background threads run.

On vLLM's CPU backend each worker process is bound to its OpenMP cores (`VLLM_CPU_OMP_THREADS_BIND`),
and every thread it starts inherits that binding: kvreuse's store thread (ingest, patch fits,
demotion), its copy-out thread and its I/O threads would share the forward's cores, and every
millisecond they run is taken from a prefill.  vLLM keeps other cores for the engine core and the
API server (`reserved_cpus` in its binding log), which wait while the worker computes; kvreuse's
threads run there (`set_background_cpus`, called by the connector before it starts any thread).
Without a binding (a GPU server, `nobind`) nothing is changed.

Each background thread calls `enter_background` first (a `ThreadPoolExecutor` initializer or the
first line of a thread's target); on Linux `os.sched_setaffinity(0, ...)` and `setpriority` act
on the calling thread only.

It also runs the thread's PyTorch ops on that thread alone (`serial_torch`).  With OpenMP every
thread that enters a parallel region gets a team of its own, and the GNU runtime counts every
team's threads: once they outnumber the CPUs, *all* teams stop spinning between regions and sleep,
so each op of the forward waits for its team to wake (`bench/step_bench.py`, one process on 2 cores:
a decode step 10.63 ms with kvreuse's threads opening teams of their own, 5.62 ms with them serial,
5.4 ms for vLLM alone).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from typing import Any, Iterable

log = logging.getLogger("kvreuse")

_cpus: frozenset[int] | None = None


def set_background_cpus(cpus: Iterable[int] | None) -> None:
    """The CPUs kvreuse's background threads started from now on run on (None: where they are started)."""
    global _cpus
    _cpus = frozenset(cpus) if cpus else None


def enter_background(nice: int = 0) -> None:
    """Move the calling thread to the background CPUs; where it stays on the cores it started on (no
    background CPUs), lower its priority by `nice`, so that the forward computing there wins them.

    Moved, it keeps the process' priority: a thread at a lower priority that is descheduled while it
    holds the GIL stalls every other thread of the process, the forward's included (measured: nothing
    reusable through vLLM's client, mean TTFT 1.13x / throughput 0.88x of vLLM alone at nice 10 on the
    reserved core, 0.86x / 1.00x at 0).  `KVREUSE_BACKGROUND_NICE` overrides either."""
    tid = threading.get_native_id()
    serial_torch()
    moved = False
    if _cpus:
        try:
            os.sched_setaffinity(0, _cpus)  # Linux: the calling thread
            moved = True
        except (OSError, AttributeError, ValueError):
            pass
    nice = int(os.environ.get("KVREUSE_BACKGROUND_NICE", 0 if moved else nice))
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)  # this thread only
        except (OSError, AttributeError):
            pass


_OPENMP_LIB = re.compile(r"/lib(gomp|iomp5|omp)[-.\w]*\.so[.\d]*$")
_openmp: ctypes.CDLL | None | bool = False  # False: not found yet


def _openmp_candidates(torch_dir: str) -> list[str]:
    """OpenMP runtimes loaded in this process, PyTorch's own first (other wheels bundle theirs too:
    sentencepiece ships a libgomp of its own, whose thread count PyTorch never reads)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if _OPENMP_LIB.search(line.rstrip())}
    except OSError:
        return []
    site = os.path.dirname(torch_dir)
    return sorted(paths, key=lambda p: (not p.startswith(torch_dir),
                                        not os.path.basename(os.path.dirname(p)).startswith("torch"),
                                        not p.startswith(site), p))


def serial_torch() -> bool:
    """Run the calling thread's PyTorch CPU ops on it alone (OpenMP's thread count is per thread; vLLM's CPU
    worker replaces `torch.set_num_threads`, which would also touch process-wide pools).  True if it did."""
    global _openmp
    try:
        import torch
    except ImportError:
        return False
    if torch.get_num_threads() == 1:  # PyTorch sets a thread's OpenMP count at its first use: let it first
        return True
    libs = [_openmp] if _openmp else [] if _openmp is None else _openmp_candidates(os.path.dirname(torch.__file__))
    for path_or_lib in libs:
        try:
            lib = path_or_lib if isinstance(path_or_lib, ctypes.CDLL) else ctypes.CDLL(path_or_lib)  # loaded: same handle
            lib.omp_set_num_threads(1)
        except (OSError, AttributeError):
            continue
        if torch.get_num_threads() == 1:  # the runtime PyTorch reads
            _openmp = lib
            return True
    if _openmp is False:
        _openmp = None
        log.debug("kvreuse: could not find PyTorch's OpenMP runtime; background threads' ops stay parallel")
    return False


def configured_background_cpus(vllm_config: Any, env: str | None = None) -> frozenset[int] | None:
    """`KVREUSE_BACKGROUND_CPUS`: unset or `auto`: `vllm_background_cpus`; `off`: threads stay where
    they start (with the worker); a list (`1,3` or `2-5`): those CPUs."""
    val = (os.environ.get("KVREUSE_BACKGROUND_CPUS", "auto") if env is None else env).strip().lower()
    if val in ("", "auto"):
        return vllm_background_cpus(vllm_config)
    if val in ("off", "none", "no"):
        return None
    cpus: set[int] = set()
    try:
        for part in val.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"KVREUSE_BACKGROUND_CPUS: expected auto, off or a CPU list such as 1,3 or 2-5, got {val!r}")
    return frozenset(cpus) or None


def vllm_background_cpus(vllm_config: Any) -> frozenset[int] | None:
    """CPUs of this host that vLLM's CPU backend binds no worker's OpenMP threads to: its reserved CPUs
    (from vLLM's own `OMPProcessManager`, as it computed them at startup), or every allowed CPU outside
    the workers' lists.  None: not the CPU backend, no binding (`nobind`), or no CPU left over."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return None
        from vllm.utils.ompmultiprocessing import OMPProcessManager
    except Exception:  # an older or other vLLM: leave threads where they start
        return None
    quiet = logging.getLogger("vllm.utils.ompmultiprocessing")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs its binding (and a reserved-CPU warning) once already, at startup
    try:
        m = OMPProcessManager(vllm_config)
    except Exception as e:
        log.debug("kvreuse: cannot read vLLM's CPU binding (%s); background threads stay with the worker", e)
        return None
    finally:
        quiet.setLevel(level)
    if getattr(m, "skip_setup", True):
        return None
    bound = {c for cpus in getattr(m, "cpu_lists", []) for c in cpus}
    try:
        allowed = os.sched_getaffinity(os.getppid())  # the engine core: not bound
    except (OSError, AttributeError):
        allowed = set(range(os.cpu_count() or 1))
    reserved = set(getattr(m, "reserved_cpu_list", []) or []) & allowed
    out = (reserved or (allowed - bound)) - bound
    return frozenset(out) or None
