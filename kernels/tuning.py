"""Measured launch tables for the Triton kernels: per GPU model and shape bucket, one launch config.

Every kernel's config function (shrink_config, expand_config, pool_config) has a heuristic, the
documented default. A table measured on one GPU model by benchmarks/tune_kernels.py overrides it
for the shape buckets the table holds; every other shape keeps the heuristic. A table is JSON:

    {"format": 1, "gpu": "NVIDIA H100 80GB HBM3", "triton": "3.1.0",
     "ops": {"shrink": {"16,4,576,16,2": {"BLOCK_M": 16, "BLOCK_N": 16, ...}}, ...},
     "measured": {...}}     (any other top-level field, e.g. the tuner's timings, is not read)

A key is the op's shape tuple as its kernel module's key function makes it (lora_shrink.shrink_key,
...: size dims bucketed by bucket(), model dims exact), joined by commas. An entry holds exactly the
op's tunable launch parameters (register()); flags that follow from the shape (EVEN_K, EVEN_R,
ONE_CHUNK, BLOCK_D) are always computed by the kernel module, never read from a table. A table is
validated in full when it is loaded, so a bad entry never reaches a launch.

Which table a device uses (table_for), resolved once per device (reset() forgets):
- the file BSHAREDRAG_KERNEL_TABLE names, if set, on every device (tests on the Triton
  interpreter, or trying a table before shipping it);
- else on a CUDA device kernels/tuned/<gpu_slug(torch.cuda.get_device_name())>.json, if present;
- else none: the heuristics.
A table made with another triton major.minor is ignored with a warning: its configs were checked
and timed with another compiler.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import triton

__all__ = ["FORMAT", "ENV_TABLE", "TUNED_DIR", "Table", "register", "spec", "bucket", "key_string", "gpu_slug",
           "make_table", "load", "table_for", "lookup", "using", "reset"]

FORMAT = 1
ENV_TABLE = "BSHAREDRAG_KERNEL_TABLE"
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
# Largest bucket of a row count (max_count, adapters, sequences): beyond it grids are large enough
# that the configs no longer change with the size.
MAX_BUCKET = 4096

# op -> (key field names, {launch parameter: (lo, hi, power of two)}), filled by the kernel modules
_OPS: dict[str, tuple[tuple[str, ...], dict[str, tuple[int, int, bool]]]] = {}
_by_device: dict = {}  # torch.device (or None) -> Table | None, resolved once
_override: list = []  # using()'s stack: its top, when any, is every device's table


def register(op: str, key_fields: tuple[str, ...], fields: dict[str, tuple[int, int, bool]]) -> None:
    """Declare op's key (field names, in order) and the launch parameters its entries hold, each an
    int in [lo, hi] (a power of two when the flag says so). Called by the kernel modules at import."""
    _OPS[op] = (tuple(key_fields), dict(fields))


def spec(op: str) -> tuple[tuple[str, ...], dict[str, tuple[int, int, bool]]]:
    """(key field names, {launch parameter: (lo, hi, power of two)}) of a registered op."""
    return _OPS[op]


def bucket(n: int, cap: int = MAX_BUCKET) -> int:
    """n rounded up to a power of 4 (1, 4, 16, 64, ...), at most cap (a power of 4 itself).

    Size dims are keyed by bucket so that a table stays small and covers every size: the tuner
    measures each bucket at its top value, and lookups of any size in it find that entry."""
    m = (max(1, int(n)) - 1).bit_length()
    return min(cap, 1 << (m + (m & 1)))


def key_string(key: tuple) -> str:
    """A key tuple as a table's JSON holds it: its ints joined by commas."""
    return ",".join(str(int(v)) for v in key)


def gpu_slug(name: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def make_table(gpu: str, ops: dict, **extra) -> dict:
    """A table's JSON object, made with this triton (what tune_kernels.py writes)."""
    return {"format": FORMAT, "gpu": gpu, "triton": triton.__version__, "ops": ops, **extra}


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


class Table:
    """A validated launch table: the GPU and triton it was made with, and per op {key string: entry}."""

    def __init__(self, data: object, source: str = "<table>") -> None:
        self.source = source
        self.gpu, self.triton = _header(data, source)
        self.ops = {op: _entries(op, entries, source) for op, entries in _dict(data["ops"], source, "ops").items()}

    def get(self, op: str, key: tuple) -> dict | None:
        """A copy of op's entry for key (a key function's tuple), or None."""
        entry = self.ops.get(op, {}).get(key_string(key))
        return None if entry is None else dict(entry)


def _fail(source: str, field: str, problem: str) -> ValueError:
    return ValueError(f"kernel table {source}: {field}: {problem}")


def _dict(value: object, source: str, field: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(source, field, f"expected an object, got {type(value).__name__}")
    return value


def _header(data: object, source: str) -> tuple[str, str]:
    data = _dict(data, source, "top level")
    for field in ("format", "gpu", "triton", "ops"):
        if field not in data:
            raise _fail(source, field, "missing")
    if data["format"] != FORMAT:
        raise _fail(source, "format", f"{data['format']!r}, this code reads format {FORMAT}")
    if not isinstance(data["gpu"], str):
        raise _fail(source, "gpu", "expected a string")
    if not isinstance(data["triton"], str) or not re.match(r"\d+\.\d+", data["triton"]):
        raise _fail(source, "triton", f"expected a version string, got {data['triton']!r}")
    return data["gpu"], data["triton"]


def _entries(op: str, entries: object, source: str) -> dict[str, dict[str, int]]:
    if op not in _OPS:
        raise _fail(source, f"ops.{op}", f"unknown op (known: {', '.join(sorted(_OPS))})")
    key_fields, fields = _OPS[op]
    out = {}
    for key, entry in _dict(entries, source, f"ops.{op}").items():
        where = f"ops.{op}[{key!r}]"
        parts = key.split(",")
        if len(parts) != len(key_fields) or not all(p.isdigit() for p in parts):
            raise _fail(source, where, f"a key is {len(key_fields)} comma-separated ints ({','.join(key_fields)})")
        entry = _dict(entry, source, where)
        for name in entry:
            if name not in fields:
                raise _fail(source, f"{where}.{name}", f"not a tunable launch parameter of {op} ({', '.join(fields)})")
        for name, (lo, hi, pow2) in fields.items():
            value = entry.get(name)
            if value is None:
                raise _fail(source, f"{where}.{name}", "missing")
            if type(value) is not int or not lo <= value <= hi or (pow2 and value & (value - 1)):
                kind = "a power of two" if pow2 else "an int"
                raise _fail(source, f"{where}.{name}", f"{value!r} is not {kind} in [{lo}, {hi}]")
        out[key_string(tuple(int(p) for p in parts))] = dict(entry)
    return out


def load(path: str | os.PathLike) -> Table | None:
    """The table in a JSON file, validated (ValueError naming the file and the field if it is
    malformed); None, with a warning, if it was made with another triton major.minor."""
    source = str(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise _fail(source, f"line {e.lineno}", f"not JSON ({e.msg})") from None
    _, made_with = _header(data, source)
    if _major_minor(made_with) != _major_minor(triton.__version__):
        warnings.warn(f"kernel table {source} was made with triton {made_with}, this is {triton.__version__}: "
                      "ignored (its configs may not be valid)", stacklevel=2)
        return None
    return Table(data, source)


def _resolve(device: torch.device | None) -> Table | None:
    path = os.environ.get(ENV_TABLE)
    if path:
        return load(path)
    if device is not None and device.type == "cuda":
        shipped = TUNED_DIR / f"{gpu_slug(torch.cuda.get_device_name(device))}.json"
        if shipped.is_file():
            return load(shipped)
    return None


def table_for(device: torch.device | None) -> Table | None:
    """The table launches on device use (see the module docstring). A dict hit after the first
    call per device: the config functions call it on the decode hot path."""
    if _override:
        return _override[-1]
    try:
        return _by_device[device]
    except KeyError:
        table = _by_device[device] = _resolve(device)
        return table


def lookup(op: str, key: tuple, device: torch.device | None) -> dict | None:
    """The entry of device's table for op and key (a key function's tuple), or None."""
    table = table_for(device)
    return None if table is None else table.get(op, key)


@contextmanager
def using(table: Table | None) -> Iterator[None]:
    """Within the block every device uses table (None: no table, the heuristics): the tuner times
    candidates through the kernels' own launch path this way."""
    _override.append(table)
    try:
        yield
    finally:
        _override.pop()


def reset() -> None:
    """Forget the tables resolved so far (after changing BSHAREDRAG_KERNEL_TABLE or a table file)."""
    _by_device.clear()
