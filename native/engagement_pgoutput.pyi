"""The native pgoutput assembler (src/lib.rs); engagement_dagster.lib.pgoutput is its reference."""

from types import ModuleType

from engagement_dagster.lib.pgoutput import Relation, Transaction, Type

class Assembler:
    """pgoutput.TransactionAssembler's interface and results; one per replication connection."""

    def __init__(self, reference: ModuleType) -> None: ...
    def feed(
        self, payload: bytes | bytearray | memoryview, *, wal_lsn: int | None = None
    ) -> Transaction | None: ...
    @property
    def in_transaction(self) -> bool: ...
    def discard_open_transaction(self) -> None: ...
    @property
    def relations(self) -> dict[int, Relation]: ...
    @property
    def types(self) -> dict[int, Type]: ...
