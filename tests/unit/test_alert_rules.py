"""The alert rules and Prometheus config of deploy/prometheus/, checked by promtool itself.

promtool validates the PromQL and the config, and runs the rule unit tests of
deploy/prometheus/tests/; this module adds what promtool cannot know (every alert tested both
ways, runbooks that lead somewhere). A missing promtool fails with the fix, never skips.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "rules" / "engagement.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests" / "engagement_test.yml"
README = REPO_ROOT / "README.md"

SEVERITIES = ("critical", "warning")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed; it checks the alert rules. Fix: `make install` "
            "(scripts/bootstrap.sh) or `sudo apt-get install -y --no-install-recommends "
            "prometheus`",
            pytrace=False,
        )
    return subprocess.run(
        [path, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def assert_succeeds(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"`{' '.join(result.args)}` failed:\n{result.stdout}\n{result.stderr}"
    )


@cache
def alert_rules() -> tuple[dict[str, Any], ...]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return tuple(rule for group in groups for rule in group["rules"] if "alert" in rule)


def readme_anchors() -> set[str]:
    """GitHub's anchors of README.md's headings: lower case, punctuation dropped, spaces to -."""
    anchors = set()
    for line in README.read_text().splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_rules_pass_promtool_check() -> None:
    assert_succeeds(promtool("check", "rules", str(RULES.relative_to(REPO_ROOT))))


def test_config_passes_promtool_check_and_loads_the_rules() -> None:
    result = promtool("check", "config", str(CONFIG.relative_to(REPO_ROOT)))
    assert_succeeds(result)
    # rule_files are resolved relative to prometheus.yml; a glob matching nothing is no error.
    assert str(RULES.relative_to(PROMETHEUS_DIR)) in result.stdout + result.stderr, (
        f"prometheus.yml does not load {RULES.relative_to(REPO_ROOT)}:\n{result.stdout}"
    )


def test_rule_unit_tests_pass() -> None:
    assert_succeeds(promtool("test", "rules", str(RULE_TESTS.relative_to(REPO_ROOT))))


def test_every_alert_is_tested_firing_and_every_tested_alert_exists() -> None:
    # An alert_rule_test for a misspelt alert name that expects nothing passes in promtool.
    names = {rule["alert"] for rule in alert_rules()}
    fired, tested = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test") or []:
            tested.add(check["alertname"])
            if check.get("exp_alerts"):
                fired.add(check["alertname"])
    assert not tested - names, f"rule tests name alerts that do not exist: {tested - names}"
    assert not names - fired, (
        f"alerts never shown firing in {RULE_TESTS.relative_to(REPO_ROOT)}: {names - fired}"
    )


def test_every_alert_has_for_severity_and_annotations() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), f"alert names are not unique: {names}"
    for rule in alert_rules():
        name = rule["alert"]
        assert name.startswith("Engagement"), f"alert {name} is not named Engagement..."
        assert "for" in rule, f"alert {name} has no `for` (write `for: 0m` to fire at once)"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, (
            f"alert {name} has severity {rule.get('labels', {}).get('severity')!r}, "
            f"not one of {SEVERITIES}"
        )
        annotations = rule.get("annotations") or {}
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key), f"alert {name} has no {key} annotation"


def test_runbooks_point_at_readme_sections_that_name_the_alert() -> None:
    anchors = readme_anchors()
    readme = README.read_text()
    for rule in alert_rules():
        runbook = rule["annotations"]["runbook"]
        path, _, anchor = runbook.partition("#")
        assert path == "README.md" and anchor in anchors, (
            f"alert {rule['alert']} has runbook {runbook!r}: no such README.md heading "
            f"(README headings: {sorted(anchors)})"
        )
        assert f"`{rule['alert']}`" in readme, (
            f"README.md does not describe alert {rule['alert']} (the Alerts table under Monitoring)"
        )
