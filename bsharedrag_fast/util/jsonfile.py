"""The JSON files we read and write. Reading one a user hands us: a missing or broken file
is a one-line ValueError naming it, never a traceback from deep inside json or the OS.
Writing: beside the target and renamed into place, so a crash never leaves half a file."""
from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str, what: str = "JSON file") -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing ({what})") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not valid JSON ({what}): {e}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({what}): {e.strerror or e}") from None


def write_json(path: str, obj: Any, **dump_kw) -> None:
    """obj as JSON at path (json.dump's keywords), written to path.tmp and renamed."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, **dump_kw)
    os.replace(tmp, path)
