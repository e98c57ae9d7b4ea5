"""What `make install` leaves in .venv beyond the packages themselves."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import dagster
import polars

import engagement_dagster.lib.stream


def test_installed_modules_have_their_bytecode_compiled() -> None:
    """Where PYTHONDONTWRITEBYTECODE is set (as on this project's machines) Python never caches
    bytecode, so every process compiled its imports again at start: a stream's imports took
    1.7-2.2 s instead of 0.5-0.6 s, and each Dagster run's loading of the definitions 3.1 s
    instead of 1.5 s. scripts/bootstrap.sh compiles the packages and the project once."""
    for module in (polars, dagster, engagement_dagster.lib.stream):
        assert module.__file__ is not None
        cached = Path(importlib.util.cache_from_source(module.__file__))
        assert cached.is_file(), f"{module.__name__}: no {cached}; run make install"


def test_the_change_cursor_decodes_with_the_native_assembler_built_from_this_checkout() -> None:
    """`make install` builds native/ (Rust) into .venv; a stale build would not be this one."""
    import engagement_pgoutput

    from engagement_dagster.lib import change_cursor, pgoutput

    assert isinstance(pgoutput.new_assembler(), engagement_pgoutput.Assembler)
    assert change_cursor.new_assembler is pgoutput.new_assembler
    built = Path(engagement_pgoutput.__file__).parent
    sources = Path(__file__).resolve().parents[2] / "native" / "src"
    newest_source = max(path.stat().st_mtime for path in sources.glob("*.rs"))
    newest_build = max(path.stat().st_mtime for path in built.glob("*.so"))
    assert newest_build >= newest_source, "native/src changed since the build: run make install"
