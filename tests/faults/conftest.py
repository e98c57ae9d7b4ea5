"""Fault tests report what each scenario lost, doubled and how long it took to recover.

Every test takes the `fault_report` fixture and records its figures; they are written to
`.local/test<namespace>/fault_report.json` as the session goes, and printed as one table at the
end of the run (`make test-faults`, and `make test`, which runs this folder last).
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass, field

import pytest

from engagement_dagster.lib.settings import Settings
from tests.conftest import TEST_DIR

REPORT_FILE = TEST_DIR / "fault_report.json"


@dataclass
class FaultResult:
    """One scenario's figures. None means not measured (the test failed before it could)."""

    scenario: str
    outcome: str = "not run"
    lost: int | None = None
    doubled: int | None = None
    recovery_s: float | None = None
    seconds: float = 0.0  # the whole test, set-up included
    detail: str = ""
    per_sink: dict[str, dict[str, int]] = field(default_factory=dict)


_RESULTS: dict[str, FaultResult] = {}


class FaultReport:
    """What a test hands in: `record(lost=..., doubled=..., recovery_s=..., detail=...)`."""

    def __init__(self, scenario: str) -> None:
        self.result = FaultResult(scenario)

    def record(
        self,
        *,
        lost: int,
        doubled: int,
        recovery_s: float | None,
        detail: str = "",
        per_sink: dict[str, dict[str, int]] | None = None,
    ) -> None:
        self.result.lost, self.result.doubled = lost, doubled
        self.result.recovery_s = None if recovery_s is None else round(recovery_s, 1)
        self.result.detail = detail
        self.result.per_sink = per_sink or {}
        print(
            f"\n[fault report] {self.result.scenario}: lost {lost}, doubled {doubled}, "
            f"recovery {_seconds(self.result.recovery_s)}" + (f" ({detail})" if detail else "")
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" or report.failed:
        item.stash[_OUTCOME] = "passed" if report.passed else report.outcome
    return report


_OUTCOME = pytest.StashKey[str]()


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Iterator[FaultReport]:
    started = time.monotonic()
    name = request.node.nodeid.removeprefix("tests/faults/")
    report = FaultReport(name)
    yield report
    report.result.seconds = round(time.monotonic() - started, 1)
    report.result.outcome = request.node.stash.get(_OUTCOME, "passed")
    _RESULTS[name] = report.result
    REPORT_FILE.parent.mkdir(parents=True, exist_ok=True)
    REPORT_FILE.write_text(json.dumps([asdict(r) for r in _RESULTS.values()], indent=2) + "\n")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _RESULTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault scenarios: lost, doubled, recovery")
    width = max(len(r.scenario) for r in _RESULTS.values())
    write(f"{'scenario':<{width}}  {'outcome':<7}  {'lost':>5}  {'doubled':>7}  "
          f"{'recovery':>9}  {'test':>7}")  # fmt: skip
    for r in _RESULTS.values():
        lost = "-" if r.lost is None else str(r.lost)
        doubled = "-" if r.doubled is None else str(r.doubled)
        write(f"{r.scenario:<{width}}  {r.outcome:<7}  {lost:>5}  {doubled:>7}  "
              f"{_seconds(r.recovery_s):>9}  {r.seconds:>5.0f} s")  # fmt: skip
        if r.detail:
            write(f"{'':<{width}}    {r.detail}")
    write(f"(saved in {REPORT_FILE})")


@pytest.fixture(scope="session")
def private_services(services: Settings) -> Iterator[Settings]:
    """A PostgreSQL and a Redis of the fault tests' own (ports and data directories): the
    scenarios restart them, reconfigure them and load them with huge or long transactions, which
    must not disturb other sessions. Kafka stays the session's (topics of their own). Stopped at
    the end."""
    from engagement_dagster.lib.local_services import LocalPostgres, LocalRedis, ServiceError
    from tests.faults.stack import private_postgres_settings, private_redis, redis_ready, wait_until

    settings, _ = private_redis(private_postgres_settings(services))
    started: list[LocalPostgres | LocalRedis] = []
    for service in (LocalPostgres(settings), LocalRedis(settings)):
        try:
            service.start()
        except ServiceError as exc:
            for running in started:
                running.stop()
            pytest.fail(f"the fault tests' private {service.name} could not start: {exc}",
                        pytrace=False)  # fmt: skip
        started.append(service)
    wait_until(lambda: redis_ready(settings.redis_url), timeout_s=60, what="private Redis")
    yield settings
    for service in reversed(started):
        service.stop()
