"""kvreuse: a position-free chunk KV cache for vLLM.

The core operator moves a chunk's cached keys to a new position by exact RoPE re-rotation and
adds a rank-m conditioning patch for what the chunk absorbed from its neighbours.  Nothing in
this package imports vLLM at import time; only `kvreuse.connector` and `RopeSpec.from_vllm` do.
"""

from kvreuse.errors import KVReuseError, UnsupportedRope
from kvreuse.ops import relocate
from kvreuse.patch import Factors, Patch, fit_patch, relocate_and_patch
from kvreuse.rope.spec import RopeSpec

__version__ = "0.1.0"

__all__ = ["Factors", "KVReuseError", "Patch", "RopeSpec", "UnsupportedRope", "fit_patch", "relocate",
           "relocate_and_patch", "__version__"]
