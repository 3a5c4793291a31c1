"""The serving benches' shared command line and result file.

    ap = bench_parser(__doc__, repeats=3, quick="smoke test: 3 turns, 1 repeat")
    ap.add_argument("--turns", type=int, default=6)          # what is the bench's own
    a = parse_bench_args(ap, quick={"turns": 3, "repeats": 1})
    ... kvreuse_config(a) ... rep_seed(a.seed, rep) ...
    write_result(a, "raw_agent", model=spec.tag(), summary=summary, **runs.fields())

Every bench takes `--repeats`, `--seed`, `--kvreuse-config`, `--quick` and `--out`, and those that
choose the served dtype `--dtype`.  A result file holds `bench`, `args` (every option's value), the
bench's own fields, and `host` / `host_detail` / `command` (`serve_common.host_record`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.serve_common import host_record, write_json  # noqa: E402

DTYPES = ("bfloat16", "float32")


def bench_parser(doc: str, *, repeats: int, quick: str, seed: bool = True, dtype: str | None = None,
                 dtype_choices: tuple[str, ...] | None = DTYPES,
                 kvreuse_config: str = "JSON for the kvreuse arm (default: serve_common's)") -> argparse.ArgumentParser:
    """A parser described by `doc`'s first paragraph with the common options: `--repeats` (default `repeats`),
    `--seed` (unless `seed` is False), `--kvreuse-config`, `--dtype` (when `dtype` gives its help), `--quick`
    (help `quick`) and `--out`."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("common options")
    g.add_argument("--repeats", type=int, default=repeats)
    if seed:
        g.add_argument("--seed", type=int, default=0)
    g.add_argument("--kvreuse-config", default=None, help=kvreuse_config)
    if dtype is not None:
        g.add_argument("--dtype", default="bfloat16", choices=dtype_choices, help=dtype)
    g.add_argument("--quick", action="store_true", help=quick)
    g.add_argument("--out", default=None, help="write the results as JSON here")
    return ap


def parse_bench_args(ap: argparse.ArgumentParser, quick: dict, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv`; with `--quick`, the values of `quick` replace the options'."""
    a = ap.parse_args(argv)
    if a.quick:
        for k, v in quick.items():
            setattr(a, k, v)
    return a


def kvreuse_config(a: argparse.Namespace, default: dict | None = None) -> dict | None:
    """The kvreuse arm's config: `--kvreuse-config` parsed, else `default` (None: serve_common's)."""
    return json.loads(a.kvreuse_config) if a.kvreuse_config else default


def rep_seed(seed: int, rep: int, scale: int = 1000) -> int:
    """Seed of repeat `rep`'s workload in a run of `--seed seed`: distinct for every (seed, rep < scale)."""
    return scale * (seed + 1) + rep


def write_result(a: argparse.Namespace, bench: str, **fields) -> dict:
    """Write `--out` (when given): `bench`, `args`, `fields`, then where and how it ran (`host_record`)."""
    obj = {"bench": bench, "args": vars(a), **fields, **host_record()}
    write_json(a.out, obj)
    return obj
