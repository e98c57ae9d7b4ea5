"""Structure of docker-compose.yml and deploy/docker/: services, ports, env contract, wiring.

Reads the files only and never runs Docker, so it holds on machines without a Docker engine.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from engagement_dagster.lib.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKER_DIR = REPO_ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"

STATEFUL_SERVICES = ("postgres", "dagster-postgres", "redis", "clickhouse", "kafka")
DAGSTER_SERVICES = ("code-location", "dagster-webserver", "dagster-daemon")
PROJECT_SERVICES = ("engagement-init", *DAGSTER_SERVICES, "engagement-metrics")
MONITORING_SERVICES = ("prometheus", "grafana")
EXPECTED_SERVICES = (*STATEFUL_SERVICES, *PROJECT_SERVICES, *MONITORING_SERVICES)
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"

# Settings every project container must receive explicitly (DESIGN §9): their local defaults point
# at 127.0.0.1 or at embedded chDB, which mean nothing inside a container.
REQUIRED_SETTINGS = (
    "pg_dsn",
    "redis_url",
    "clickhouse_url",
    "kafka_bootstrap",
    "slot",
    "publication",
    "stream_run_seconds",
)

_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")


@cache
def _load_yaml(path: Path) -> Any:
    assert path.is_file(), f"{path.relative_to(REPO_ROOT)} is missing"
    return yaml.safe_load(path.read_text())


def _services() -> dict[str, Any]:
    compose = _load_yaml(COMPOSE_FILE)
    assert isinstance(compose, dict), "docker-compose.yml is not a YAML mapping"
    services = compose.get("services")
    assert isinstance(services, dict), "docker-compose.yml has no `services:` mapping"
    return services


def _environment(service: str) -> dict[str, str]:
    """A service's environment as a dict, whichever of the two compose syntaxes it uses."""
    env = _services()[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def _interpolate(value: str) -> str:
    """What compose substitutes with an empty shell environment: ${VAR:-default} -> default."""
    return _INTERPOLATION.sub(lambda m: m.group("default") or "", value).replace("$$", "$")


def _command(service: str) -> list[str]:
    command = _services()[service].get("command")
    assert command, f"service {service!r} has no command"
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _option(argv: list[str], *flags: str) -> str:
    for i, part in enumerate(argv[:-1]):
        if part in flags:
            return argv[i + 1]
    raise AssertionError(f"command {shlex.join(argv)!r} has none of the options {flags}")


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def _dockerfile_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY, flags such as --chown dropped."""
    copies = []
    for keyword, args in _dockerfile_instructions():
        if keyword == "COPY":
            parts = [part for part in shlex.split(args) if not part.startswith("--")]
            copies.append((parts[:-1], parts[-1]))
    return copies


def _dockerfile_env(name: str) -> str:
    for keyword, args in _dockerfile_instructions():
        if keyword == "ENV":
            for part in shlex.split(args):
                key, sep, value = part.partition("=")
                if sep and key == name:
                    return value
    raise AssertionError(f"deploy/docker/Dockerfile never sets ENV {name}")


def _copy_destination(source: str) -> str:
    for sources, destination in _dockerfile_copies():
        if source in sources:
            return destination
    raise AssertionError(f"deploy/docker/Dockerfile never copies {source} into the image")


def _expand(value: str) -> str:
    """Expand $DAGSTER_HOME / ${DAGSTER_HOME} in a Dockerfile path."""
    home = _dockerfile_env("DAGSTER_HOME")
    return value.replace("${DAGSTER_HOME}", home).replace("$DAGSTER_HOME", home)


def _required_env_names() -> set[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    unknown = [name for name in REQUIRED_SETTINGS if name not in Settings.model_fields]
    assert not unknown, (
        f"settings {unknown} are no longer fields of Settings: update REQUIRED_SETTINGS here "
        "and the environment in docker-compose.yml together"
    )
    return {f"{prefix}{name}".upper() for name in REQUIRED_SETTINGS}


def _dagster_yaml_env_names(node: object) -> set[str]:
    """Every variable that deploy/docker/dagster.yaml reads with `{env: NAME}`."""
    if isinstance(node, Mapping):
        if set(node) == {"env"}:
            return {str(node["env"])}
        return set().union(*(_dagster_yaml_env_names(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_dagster_yaml_env_names(value) for value in node))
    return set()


def test_every_service_of_the_stack_is_defined() -> None:
    missing = sorted(set(EXPECTED_SERVICES) - set(_services()))
    assert not missing, f"docker-compose.yml lacks the services {missing}"


def test_every_published_port_binds_localhost_only() -> None:
    for name, service in _services().items():
        for port in service.get("ports") or []:
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
            else:
                parts = str(port).split(":")
                host_ip = parts[0] if len(parts) == 3 else None
            assert host_ip == "127.0.0.1", (
                f"service {name!r} publishes {port!r} on all interfaces; "
                'bind it to 127.0.0.1, e.g. "127.0.0.1:55432:5432"'
            )


def test_source_postgres_runs_with_logical_replication() -> None:
    argv = _command("postgres")
    settings = {argv[i + 1] for i, part in enumerate(argv[:-1]) if part == "-c"}
    for wanted in ("wal_level=logical", "max_replication_slots=10", "max_wal_senders=10"):
        assert wanted in settings, f"postgres is started with {argv}, without `-c {wanted}`"


def test_source_dsn_points_at_the_source_database() -> None:
    dsn = urlsplit(_interpolate(_environment("code-location")["ENGAGEMENT_PG_DSN"]))
    env = _environment("postgres")
    assert dsn.hostname == "postgres", f"ENGAGEMENT_PG_DSN host is {dsn.hostname!r}, not postgres"
    assert dsn.path.lstrip("/") == env.get("POSTGRES_DB"), (
        f"ENGAGEMENT_PG_DSN names database {dsn.path!r} but the postgres service creates "
        f"{env.get('POSTGRES_DB')!r}"
    )
    assert dsn.password == _interpolate(env.get("POSTGRES_PASSWORD", "")), (
        "ENGAGEMENT_PG_DSN and the postgres service use different default passwords"
    )


def test_kafka_is_a_single_node_kraft_broker() -> None:
    env = _environment("kafka")
    roles = {role.strip() for role in env.get("KAFKA_PROCESS_ROLES", "").split(",")}
    assert roles == {"broker", "controller"}, (
        f"KAFKA_PROCESS_ROLES is {env.get('KAFKA_PROCESS_ROLES')!r}; a single KRaft node needs "
        "broker,controller"
    )
    for name in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env.get(name) == "1", (
            f"kafka has {name}={env.get(name)!r}; a single broker needs 1 or transactional "
            "producers never initialise"
        )
    assert env.get("KAFKA_CONTROLLER_QUORUM_VOTERS"), "kafka has no KAFKA_CONTROLLER_QUORUM_VOTERS"


def test_kafka_advertises_the_addresses_clients_use() -> None:
    advertised = {
        listener.split("://", 1)[-1]
        for listener in _environment("kafka").get("KAFKA_ADVERTISED_LISTENERS", "").split(",")
    }
    bootstrap = _environment("code-location")["ENGAGEMENT_KAFKA_BOOTSTRAP"]
    assert bootstrap in advertised, (
        f"containers bootstrap from {bootstrap} but kafka advertises only {sorted(advertised)}"
    )
    host_default = Settings.model_fields["kafka_bootstrap"].default
    assert host_default in advertised, (
        f"the host CLI's default bootstrap {host_default} is not advertised by kafka "
        f"({sorted(advertised)})"
    )
    published = {str(port).split(":")[1] for port in _services()["kafka"].get("ports") or []}
    assert host_default.rpartition(":")[2] in published, (
        f"kafka advertises {host_default} but publishes only host ports {sorted(published)}"
    )


@pytest.mark.parametrize("service", PROJECT_SERVICES)
def test_project_containers_get_every_setting(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _environment(service)
    missing = sorted((_required_env_names() | {"DAGSTER_HOME"}) - set(env))
    assert not missing, f"service {service!r} lacks the environment variables {missing}"

    prefix = Settings.model_config.get("env_prefix", "").upper()
    known = {
        (info.alias or f"{prefix}{field}").upper() for field, info in Settings.model_fields.items()
    }
    unknown = sorted(name for name in env if name.startswith(prefix) and name not in known)
    assert not unknown, (
        f"service {service!r} sets {unknown}, which Settings does not read (typo or stale name?)"
    )

    for name, value in env.items():
        monkeypatch.setenv(name, _interpolate(value))
    settings = Settings()
    for url in (settings.pg_dsn, settings.redis_url, settings.clickhouse_url):
        host = urlsplit(url).hostname
        assert host in _services(), f"service {service!r} connects to {url}: no service {host!r}"
    for address in settings.kafka_bootstrap.split(","):
        host = address.rpartition(":")[0]
        assert host in _services(), f"service {service!r} bootstraps Kafka from unknown {host!r}"


def test_dagster_home_is_where_the_image_puts_dagster_yaml() -> None:
    home = _dockerfile_env("DAGSTER_HOME")
    destination = _expand(_copy_destination("deploy/docker/dagster.yaml"))
    assert destination.rstrip("/") in (home, f"{home}/dagster.yaml"), (
        f"the image copies dagster.yaml to {destination}, not into DAGSTER_HOME={home}"
    )
    for service in PROJECT_SERVICES:
        value = _environment(service).get("DAGSTER_HOME")
        assert value == home, f"service {service!r} has DAGSTER_HOME={value!r}, image has {home}"


def test_project_containers_share_one_build() -> None:
    services = _services()
    builds = {name: services[name].get("build") for name in PROJECT_SERVICES}
    images = {name: services[name].get("image") for name in PROJECT_SERVICES}
    assert all(builds.values()), f"project services without a build: {builds}"
    assert len({yaml.safe_dump(build) for build in builds.values()}) == 1, (
        f"project services are built differently, so they could run different code: {builds}"
    )
    assert len(set(images.values())) == 1, f"project services name different images: {images}"

    build = builds["code-location"]
    context = REPO_ROOT / (build.get("context", ".") if isinstance(build, dict) else build)
    dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
    assert context.resolve() == REPO_ROOT, f"build context is {context}, not the repository root"
    assert (context / dockerfile).resolve() == DOCKERFILE, (
        f"the build uses {dockerfile}, not deploy/docker/Dockerfile"
    )


def test_image_installs_the_locked_project_without_dev_tools() -> None:
    instructions = _dockerfile_instructions()
    base = next(args for keyword, args in instructions if keyword == "FROM")
    assert base.split()[0] == "python:3.11-slim", f"the image is based on {base}"
    runs = " ; ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(r"uv (sync|export)[^;&]*--(frozen|locked)", runs), (
        "the image does not install from uv.lock (`uv sync --frozen` or `uv export --frozen`)"
    )
    assert "--extra dev" not in runs and "--all-extras" not in runs, (
        "the image installs the dev extra (pytest, ruff, mypy)"
    )


def test_the_image_builds_the_native_decoder_and_leaves_its_toolchain_behind() -> None:
    """uv.lock has native/ (Rust) as a path source: the first `uv sync` builds it with cargo."""
    instructions = _dockerfile_instructions()
    first_sync = next(
        i
        for i, (keyword, args) in enumerate(instructions)
        if keyword == "RUN" and "uv sync" in args
    )
    before = instructions[:first_sync]
    assert any(k == "COPY" and "native" in shlex.split(a) for k, a in before), (
        "native/ is not in the build before the first uv sync, which must build it"
    )
    assert any(k == "RUN" and "rustup" in a for k, a in before), "no Rust toolchain to build it"
    stages = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(stages) == 2 and stages[-1] == "python:3.11-slim", (
        f"the final image should be a fresh python:3.11-slim without the toolchain: {stages}"
    )
    final = instructions[[k for k, _ in instructions].index("FROM", 1) :]
    assert ("COPY", "--from=build /opt/dagster/venv /opt/dagster/venv") in final


def test_dockerignore_keeps_local_state_out_but_not_what_the_image_copies() -> None:
    path = REPO_ROOT / ".dockerignore"
    assert path.is_file(), ".dockerignore is missing: .venv and .local would enter the build"
    patterns = [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for wanted in (".venv", ".local", ".git"):
        assert wanted in patterns, f".dockerignore does not exclude {wanted}"
    for sources, _ in _dockerfile_copies():
        for source in sources:
            excluded = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(source, p)]
            assert not excluded, f".dockerignore {excluded} drops {source}, which COPY needs"


def test_dagster_yaml_is_a_valid_instance_on_postgres_storage() -> None:
    # Dagster's own loader checks the file against the instance schema (unknown keys fail).
    from dagster._core.instance.config import dagster_instance_config

    config, _ = dagster_instance_config(str(DOCKER_DIR), "dagster.yaml")
    storage = config.get("storage") or {}
    assert "postgres_db" in (storage.get("postgres") or {}), (
        f"deploy/docker/dagster.yaml stores runs in {sorted(storage)}, not postgres.postgres_db"
    )
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator", (
        "the daemon's run queue needs run_coordinator QueuedRunCoordinator"
    )
    assert config["run_launcher"]["class"] == "DefaultRunLauncher", "run_launcher is not default"
    assert config.get("run_monitoring", {}).get("enabled") is True, "run_monitoring is not enabled"
    assert config.get("telemetry", {}).get("enabled") is False, "telemetry is not disabled"


def test_dagster_storage_variables_match_dagster_postgres() -> None:
    needed = _dagster_yaml_env_names(_load_yaml(DOCKER_DIR / "dagster.yaml"))
    assert needed, "deploy/docker/dagster.yaml reads no {env: ...} variables"
    for service in PROJECT_SERVICES:
        missing = sorted(needed - set(_environment(service)))
        assert not missing, f"service {service!r} lacks {missing}, read by dagster.yaml"

    env = {k: _interpolate(v) for k, v in _environment("code-location").items()}
    db_env = {k: _interpolate(v) for k, v in _environment("dagster-postgres").items()}
    assert env["DAGSTER_PG_HOST"] == "dagster-postgres", (
        f"DAGSTER_PG_HOST is {env['DAGSTER_PG_HOST']!r}: Dagster storage belongs in "
        "dagster-postgres, never in the source database"
    )
    for ours, theirs in (
        ("DAGSTER_PG_USER", "POSTGRES_USER"),
        ("DAGSTER_PG_PASSWORD", "POSTGRES_PASSWORD"),
        ("DAGSTER_PG_DB", "POSTGRES_DB"),
    ):
        assert env[ours] == db_env.get(theirs), (
            f"{ours}={env[ours]!r} but dagster-postgres has {theirs}={db_env.get(theirs)!r}"
        )


def test_workspace_points_at_the_code_location_server() -> None:
    from dagster._core.workspace.config_schema import ensure_workspace_config

    path = DOCKER_DIR / "workspace.yaml"
    # Dagster's own schema check first: a misspelt key fails here with Dagster's message.
    ensure_workspace_config(_load_yaml(path), str(path))
    entries: list[dict[str, Any]] = _load_yaml(path)["load_from"]
    servers = [entry["grpc_server"] for entry in entries if "grpc_server" in entry]
    assert len(servers) == 1, f"workspace.yaml should load one grpc_server, has {servers}"
    server = servers[0]

    argv = _command("code-location")
    assert argv[:3] == ["dagster", "code-server", "start"], f"code-location runs {argv}"
    tool = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["dagster"]
    assert _option(argv, "-m", "--module-name") == tool["module_name"], (
        f"code-location serves {_option(argv, '-m', '--module-name')}, "
        f"pyproject names {tool['module_name']}"
    )
    assert server.get("host") == "code-location", (
        f"workspace.yaml connects to host {server.get('host')!r}, not the code-location service"
    )
    assert str(server.get("port")) == _option(argv, "-p", "--port"), (
        f"workspace.yaml connects to port {server.get('port')}, code-location listens on "
        f"{_option(argv, '-p', '--port')}"
    )
    assert _option(argv, "-h", "--host") == "0.0.0.0", (
        "code-location listens on localhost only: the other containers cannot reach it"
    )
    assert server.get("location_name") == tool["code_location_name"], (
        f"location_name {server.get('location_name')!r} differs from pyproject's "
        f"{tool['code_location_name']!r}"
    )


@pytest.mark.parametrize("service", ["dagster-webserver", "dagster-daemon"])
def test_webserver_and_daemon_load_the_image_workspace(service: str) -> None:
    destination = _copy_destination("deploy/docker/workspace.yaml")
    workspace = _option(_command(service), "-w", "--workspace")
    assert workspace == destination, (
        f"{service} loads {workspace} but the image puts workspace.yaml at {destination}"
    )


def test_daemon_restarts_unless_stopped() -> None:
    restart = _services()["dagster-daemon"].get("restart")
    assert restart == "unless-stopped", f"dagster-daemon has restart={restart!r}"


def test_every_depends_on_target_exists_and_can_satisfy_its_condition() -> None:
    services = _services()
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        if isinstance(depends_on, list):
            depends_on = {target: {"condition": "service_started"} for target in depends_on}
        for target, spec in depends_on.items():
            assert target in services, f"service {name!r} depends on unknown service {target!r}"
            condition = (spec or {}).get("condition", "service_started")
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), (
                    f"{name!r} waits for {target!r} to be healthy, but it has no healthcheck"
                )
            if condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", (
                    f"{name!r} waits for {target!r} to complete, but it is restarted"
                )


def test_code_location_waits_for_every_system_and_the_schema() -> None:
    depends_on = _services()["code-location"].get("depends_on") or {}
    for target in STATEFUL_SERVICES:
        condition = (depends_on.get(target) or {}).get("condition")
        assert condition == "service_healthy", (
            f"code-location waits for {target!r} with condition {condition!r}, "
            "not service_healthy: the first stream run would fail on a starting service"
        )
    condition = (depends_on.get("engagement-init") or {}).get("condition")
    assert condition == "service_completed_successfully", (
        f"code-location waits for engagement-init with {condition!r}: the slot may not exist yet"
    )
    init = _services()["engagement-init"]
    assert _command("engagement-init") == ["engagement", "db", "init"], (
        f"engagement-init runs {_command('engagement-init')}, not `engagement db init`"
    )
    init_condition = ((init.get("depends_on") or {}).get("postgres") or {}).get("condition")
    assert init_condition == "service_healthy", "engagement-init does not wait for postgres health"


@pytest.mark.parametrize("service", STATEFUL_SERVICES)
def test_stateful_services_have_a_healthcheck_and_a_named_volume(service: str) -> None:
    definition = _services()[service]
    healthcheck = definition.get("healthcheck") or {}
    assert healthcheck.get("test") and not healthcheck.get("disable"), (
        f"service {service!r} has no healthcheck, so dependants cannot wait for it"
    )
    declared = set(_load_yaml(COMPOSE_FILE).get("volumes") or {})
    sources = {
        str(volume.get("source") if isinstance(volume, dict) else volume).split(":")[0]
        for volume in definition.get("volumes") or []
    }
    assert sources & declared, (
        f"service {service!r} keeps its data in no named volume (mounts {sorted(sources)})"
    )


def _mounts(service: str) -> dict[str, str]:
    """A service's volumes as {target: source}, short or long syntax, `:ro` dropped."""
    mounts = {}
    for volume in _services()[service].get("volumes") or []:
        if isinstance(volume, dict):
            mounts[str(volume["target"])] = str(volume["source"])
        else:
            source, target, *_ = str(volume).split(":")
            mounts[target] = source
    return mounts


def _bind_mount(service: str, repo_path: Path) -> str:
    """Where a service mounts a path of the repository."""
    for target, source in _mounts(service).items():
        if source.startswith(".") and (REPO_ROOT / source).resolve() == repo_path.resolve():
            return target
    raise AssertionError(f"service {service!r} does not mount {repo_path.relative_to(REPO_ROOT)}")


def test_every_bind_mount_exists_in_the_repository() -> None:
    for name in _services():
        for target, source in _mounts(name).items():
            if source.startswith((".", "/")):
                assert (REPO_ROOT / source).exists(), (
                    f"service {name!r} mounts {source} at {target}, which is not in the repository"
                )


@pytest.mark.parametrize("service", [*STATEFUL_SERVICES, *MONITORING_SERVICES])
def test_images_are_pinned(service: str) -> None:
    image = str(_services()[service].get("image", ""))
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and "/" not in tag, (
        f"service {service!r} runs image {image!r}: pin a tag so every checkout runs the same"
    )
    if service in MONITORING_SERVICES:
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{service!r} image {image!r}: pin x.y.z"


def test_exporter_serves_the_runs_metric_files_on_the_compose_network() -> None:
    env = {k: _interpolate(v) for k, v in _environment("engagement-metrics").items()}
    metrics_dir = env.get("ENGAGEMENT_METRICS_DIR")
    assert metrics_dir, "engagement-metrics has no ENGAGEMENT_METRICS_DIR"
    assert _command("engagement-metrics") == ["engagement", "metrics"], (
        f"engagement-metrics runs {_command('engagement-metrics')}, not `engagement metrics`"
    )
    assert env.get("ENGAGEMENT_METRICS_HOST") == "0.0.0.0", (
        "engagement-metrics listens on localhost only: Prometheus cannot scrape it"
    )
    assert not _services()["engagement-metrics"].get("ports"), (
        "engagement-metrics publishes a host port; Prometheus scrapes it on the compose network"
    )
    # Runs execute in the code-location container: the exporter reads their files and must see
    # their pids (it folds the files of processes that have ended).
    volume = _mounts("engagement-metrics").get(metrics_dir)
    assert volume in (_load_yaml(COMPOSE_FILE).get("volumes") or {}), (
        f"engagement-metrics mounts no named volume at ENGAGEMENT_METRICS_DIR={metrics_dir}"
    )
    code_env = {k: _interpolate(v) for k, v in _environment("code-location").items()}
    assert code_env.get("ENGAGEMENT_METRICS_DIR") == metrics_dir, (
        "code-location writes its metric files elsewhere than engagement-metrics reads them"
    )
    assert _mounts("code-location").get(metrics_dir) == volume, (
        f"code-location does not mount volume {volume!r} at {metrics_dir}"
    )
    assert _services()["engagement-metrics"].get("pid") == "service:code-location", (
        "engagement-metrics does not share code-location's PID namespace: it would take every "
        "run's metric files for those of ended processes and fold them away"
    )
    # An empty named volume takes the owner of its mount point in the image.
    runs = " ; ".join(args for keyword, args in _dockerfile_instructions() if keyword == "RUN")
    assert re.search(rf"mkdir[^;]*{re.escape(metrics_dir)}", runs) and re.search(
        rf"chown[^;]*dagster:dagster[^;]*{re.escape(metrics_dir)}", runs
    ), f"the image does not create {metrics_dir} owned by dagster, so runs could not write there"


def test_prometheus_scrapes_the_exporter_with_the_shipped_config_and_rules() -> None:
    mount = _bind_mount("prometheus", PROMETHEUS_DIR)
    argv = _command("prometheus")
    config_flags = [part.partition("=")[2] for part in argv if part.startswith("--config.file=")]
    assert config_flags == [f"{mount}/prometheus.yml"], (
        f"prometheus runs with {argv}, not --config.file={mount}/prometheus.yml"
    )
    config = _load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    targets = [
        target
        for job in config["scrape_configs"]
        if job["job_name"] == "engagement"
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    port = _environment("engagement-metrics").get(
        "ENGAGEMENT_METRICS_PORT", str(Settings.model_fields["metrics_port"].default)
    )
    assert targets == [f"engagement-metrics:{port}"], (
        f"job engagement scrapes {targets}, not the exporter at engagement-metrics:{port}"
    )
    depends_on = _services()["prometheus"].get("depends_on") or {}
    assert "engagement-metrics" not in depends_on, (
        "prometheus waits for engagement-metrics, so it could not alert that the exporter is down"
    )


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboards() -> None:
    datasources = _load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    providers = _load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "engagement.yml")
    for kind in ("datasources", "dashboards"):
        target = _bind_mount("grafana", GRAFANA_DIR / "provisioning" / kind)
        assert target == f"/etc/grafana/provisioning/{kind}", (
            f"grafana mounts deploy/grafana/provisioning/{kind} at {target}, where Grafana does "
            "not look for provisioning files"
        )
    (prometheus,) = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    url = urlsplit(prometheus["url"])
    assert url.hostname == "prometheus" and url.port == 9090, (
        f"the Grafana datasource points at {prometheus['url']}, not the prometheus service"
    )
    assert prometheus.get("isDefault"), "the Prometheus datasource is not Grafana's default"
    dashboards = _bind_mount("grafana", GRAFANA_DIR / "dashboards")
    paths = [provider["options"]["path"] for provider in providers["providers"]]
    assert paths == [dashboards], (
        f"the dashboard provider reads {paths}, but the dashboards are mounted at {dashboards}"
    )
    home = _environment("grafana").get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home.startswith(f"{dashboards}/"), f"home dashboard {home} is outside {dashboards}"
        assert (GRAFANA_DIR / "dashboards" / home.removeprefix(f"{dashboards}/")).is_file(), (
            f"home dashboard {home} is not in deploy/grafana/dashboards"
        )
    depends_on = _services()["grafana"].get("depends_on") or {}
    assert "prometheus" in depends_on, "grafana does not start after prometheus"


@pytest.mark.parametrize("service", MONITORING_SERVICES)
def test_monitoring_services_keep_their_data_in_named_volumes(service: str) -> None:
    declared = set(_load_yaml(COMPOSE_FILE).get("volumes") or {})
    assert set(_mounts(service).values()) & declared, (
        f"service {service!r} keeps its data in no named volume: lost with the container"
    )
    assert (_services()[service].get("healthcheck") or {}).get("test"), (
        f"service {service!r} has no healthcheck"
    )
