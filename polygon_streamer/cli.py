"""The `polygon-streamer` command: builds the Config and hands it over; no logic beyond that."""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any, Callable

import click

from . import __version__, logs
from .config import NETWORK_ONLY, SETTINGS, Config, ConfigError, _bool, build_config, unknown_variables

# Settings the demo sets itself.
_DEMO_FIXED = ("api_key", "api_key_file", "ws_url", "feed")
# The demo's subscription, per cluster: trades and quotes where the cluster has them.
DEMO_SUBSCRIPTIONS = {"stocks": "T.*,Q.*", "options": "T.*,Q.*", "futures": "T.*,Q.*", "crypto": "XT.*,XQ.*",
                      "forex": "C.*", "indices": "V.*"}
DEMO_DEFAULTS = {"cluster": "stocks"}
# demo --backfill: explicit tickers (a wildcard cannot be backfilled), a cut every DEMO_CUT_EVENTS events of which the
# local server loses DEMO_LOST_EVENTS while the demo reconnects.
DEMO_BACKFILL_SUBSCRIPTIONS = {"stocks": "T.AAPL,Q.AAPL,T.MSFT,Q.MSFT", "options": "T.O:SPY241220P00720000,"
                               "Q.O:SPY241220P00720000", "crypto": "XT.BTC-USD,XT.ETH-USD", "indices": "AM.I:SPX"}
DEMO_CUT_EVENTS = 200
DEMO_LOST_EVENTS = 25
_DEMO_HELP_DEFAULTS = {
    "cluster": "stocks",
    "metrics_addr": "127.0.0.1 on a free port (printed)",
    "subscription": "the cluster's trades and quotes: " + ", ".join(
        f"{topics} ({cluster})" for cluster, topics in DEMO_SUBSCRIPTIONS.items() if cluster != "options"
        and cluster != "futures").replace("(stocks)", "(stocks, options, futures)"),
}


def setting_options(skip: tuple[str, ...] = (), shown_defaults: dict[str, str] | None = None) -> Callable:
    """One click option per setting of config.py, each also read from its environment variable; the help shows
    shown_defaults where a command has defaults of its own."""

    def decorate(command: Callable) -> Callable:
        for setting in reversed(SETTINGS):
            if setting.field in skip:
                continue
            envvar = [setting.env, setting.fallback_env] if setting.fallback_env else setting.env
            default_text = f"default: {setting.shown_default}"
            if shown_defaults and setting.field in shown_defaults:
                default_text = f"default: {shown_defaults[setting.field]}"
            # (a fallback such as RUST_LOG is read too, but the help names only the variable to set)
            # A true/false setting may be given as a bare flag (--ndjson-gzip means true) or with a value.
            flag: dict[str, Any] = {"is_flag": False, "flag_value": "true"} if setting.parse is _bool else {}
            command = click.option(setting.flag, setting.field, envvar=envvar, default=None, type=str,
                                   show_envvar=False, metavar="[VALUE]" if flag else "VALUE", **flag,
                                   help=f"{setting.help} [{default_text}] [env var: {setting.env}]")(command)
        return command

    return decorate


def _settings(values: dict) -> dict[str, str | None]:
    return {setting.field: values.get(setting.field) for setting in SETTINGS}


def _start_logging(config: Config) -> None:
    logs.setup(config.log_level, secrets=config.secrets(), fmt=config.log_format)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="polygon-streamer")
def cli() -> None:
    """Stream Polygon.io / Massive market data into stdout, NDJSON files, ZeroMQ and Redis Streams, with capture,
    replay and reprocess of the wire."""


@cli.command()
@setting_options()
def run(**values) -> int:
    """Connect to the cluster and stream until SIGTERM/SIGINT."""
    config = build_config(_settings(values))
    _start_logging(config)
    for line in unknown_variables(os.environ):
        logs.get("polygon_config").warning(line)
    from .notify import Notifier
    from .service import run_service

    return run_service(config, notifier=Notifier.from_environ(os.environ))


@cli.command("config")
@setting_options()
@click.option("--check", is_flag=True,
              help="run every check `run` makes before connecting (key, sinks, files, ports); exit 2 with its line")
@click.option("--json", "as_json", is_flag=True, help="one JSON object (for machines) instead of the table")
@click.option("--env-file", "env_file", type=click.Path(dir_okay=False), default=None,
              help="read the settings from this environment file, as systemd's EnvironmentFile= does (an instance's "
                   "/etc/polygon-streamer/INSTANCE.env): its variables win over the environment, options over both")
def show_config(check: bool, as_json: bool, env_file: str | None, **values) -> int:
    """Print the effective configuration (secrets redacted) and exit; --check also proves that `run` would start
    (a variable of ours that is not a setting fails it: a misspelling would run on a default)."""
    environ = dict(os.environ)
    if env_file is not None:
        from .config import read_env_file

        from_file = read_env_file(env_file)
        environ.update(from_file)
        context = click.get_current_context()
        for setting in SETTINGS:
            given = context.get_parameter_source(setting.field) == click.core.ParameterSource.COMMANDLINE
            if setting.env in from_file and not given:
                values[setting.field] = from_file[setting.env]
    config = build_config(_settings(values), require_key=check)
    if check:
        unknown = unknown_variables(environ)
        if unknown:
            raise ConfigError("; ".join(unknown))
        logs.setup("off", secrets=config.secrets())
        from .service import Service

        service = Service(config)
        service.check()
        for note in service.check_notes:
            click.echo(f"config --check: {note}", err=True)
    if as_json:
        click.echo(logs.dumps(config.redacted()))
    else:
        click.echo(format_config(config))
    if check:
        click.echo("config --check: OK: every check `run` makes before connecting passed", err=True)
    return 0


def format_config(config: Config) -> str:
    """The effective configuration as VARIABLE  VALUE lines, the way the environment file spells them."""
    shown = config.redacted()
    field_of = {"ws_url": "url", "sink": "sinks"}
    rows = []
    for setting in SETTINGS:
        field = field_of.get(setting.field, setting.field)
        if field not in shown:
            continue
        value = shown[field]
        rows.append((setting.env, "" if value is None else str(value).lower() if isinstance(value, bool)
                     else str(value)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="the JSON Schema (schema.json) every line validates against")
def schema(as_json: bool) -> int:
    """Print the record schema every sink writes (data events, gap and backfill records) and exit."""
    from importlib import resources

    name = "schema.json" if as_json else "schema.md"
    click.echo(resources.files("polygon_streamer").joinpath(name).read_text(encoding="utf-8"), nl=False)
    return 0


@cli.command()
@setting_options(skip=_DEMO_FIXED + ("backfill", "rest_url"), shown_defaults=_DEMO_HELP_DEFAULTS)
@click.option("--backfill", "backfill", is_flag=True,
              help=f"gap healing end to end: the local server cuts the stream every {DEMO_CUT_EVENTS} events, loses "
                   f"{DEMO_LOST_EVENTS} while the demo reconnects, and serves them over REST; the output shows each "
                   "gap record, the backfilled events and the summary")
@click.option("--rate", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="events per second from the local server (0: as fast as possible)")
@click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True, help="events per frame")
@click.option("--max-events", type=click.IntRange(min=0), default=0, show_default=True,
              help="stop cleanly after delivering this many events (0: run until Ctrl-C)")
def demo(rate: float, batch: int, max_events: int, backfill: bool, **values) -> int:
    """Run the whole pipeline against the built-in local Polygon server: no API key, no network."""
    from .local.mockserver import MockOptions, MockServer

    key = secrets.token_hex(16)
    raw = _settings(values)
    cluster = build_config(raw, require_key=False, defaults=DEMO_DEFAULTS).cluster
    subscriptions = DEMO_BACKFILL_SUBSCRIPTIONS if backfill else DEMO_SUBSCRIPTIONS
    defaults = dict(DEMO_DEFAULTS, subscription=subscriptions.get(cluster, DEMO_SUBSCRIPTIONS[cluster]))
    options = MockOptions(api_key=key, rate=rate, batch=batch, count=max_events)
    if backfill:
        options.drop_after, options.lose_on_reconnect, options.count = DEMO_CUT_EVENTS, DEMO_LOST_EVENTS, 0
        defaults.update(backoff_initial_secs="0.2", backoff_max_secs="1")
    server = MockServer(options=options)
    if backfill:
        raw.update(backfill="on", rest_url=server.start_rest())
    server.start()
    if raw.get("metrics_addr") is None:
        raw["metrics_addr"] = "127.0.0.1:0"  # a free port: the demo must not collide with a running service
    try:
        raw.update(api_key=key, ws_url=server.url(cluster))
        config = build_config(raw, defaults=defaults)
        _start_logging(config)
        from .config import format_addr
        from .service import run_service

        def announce(service) -> None:
            click.echo(f"demo: metrics, /health and /ready on http://{format_addr(service.metrics_server.address)}",
                       err=True)

        return run_service(config, stop_after_events=max_events or None, on_started=announce)
    finally:
        server.stop()


@cli.command()
@click.option("--metrics-addr", "addr", default="127.0.0.1:9898", show_default=True, envvar="METRICS_ADDR",
              show_envvar=True, help="the running service's METRICS_ADDR")
@click.option("--json", "as_json", is_flag=True, help="the JSON of GET /subscriptions as it is")
def subscriptions(addr: str, as_json: bool) -> int:
    """Show what a running service is subscribed to: each topic's state (pending, active, refused)."""
    from .config import SETTINGS_BY_FIELD, format_addr, parse_setting
    from .tools.subscriptions_view import show

    return show(format_addr(parse_setting(SETTINGS_BY_FIELD["metrics_addr"], addr)), as_json)




@cli.command()
@click.argument("captures", nargs=-1, required=True, type=click.Path(dir_okay=False))
@setting_options(skip=NETWORK_ONLY)
@click.option("--progress/--no-progress", default=True, show_default=True, help="progress on stderr")
def reprocess(captures: tuple[str, ...], progress: bool, **values) -> int:
    """Run the pipeline (normalize, filters, sampling, sinks) over capture files, offline: no network, no key.

    The cluster is the capture's. Exit 0 when everything is written, 1 if a capture line was skipped or an event
    could not be written."""
    from .tools import reprocess as offline
    from .tools.captures import CaptureFiles

    files = CaptureFiles(list(captures))
    problems = files.unreadable()
    if problems:
        raise ConfigError("; ".join(problems))
    cluster = offline.first_cluster(files)
    if cluster is None:
        why = "; ".join(map(str, files.skipped[:5])) or "no capture record"
        click.echo(f"polygon-streamer: nothing to reprocess: {why}", err=True)
        return 1
    raw = _settings(values)
    raw["cluster"] = cluster
    config = build_config(raw, require_key=False)
    _start_logging(config)
    return offline.run(config, list(captures), progress)


def _local_server(host: str, port: int, options, source=None):
    """The local Polygon server (mock-server, replay), a busy port being one line and exit 2."""
    from .local.mockserver import MockServer

    try:
        return MockServer(host, port, options, source=source)
    except OSError as exc:
        raise ConfigError(f"invalid --host/--port {host}:{port}: cannot listen there "
                          f"({os.strerror(exc.errno) if exc.errno else exc}); pick a free port, or 0 for any") from None


def _announce(server, what: str):
    """Say where the server listens (the base URL alone on stdout, for scripts); the Event is set by SIGTERM/SIGINT."""
    import signal
    import threading

    click.echo(what, err=True)
    click.echo(f"ws://{server.host}:{server.port}")
    sys.stdout.flush()
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    return done


def _speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ConfigError(f"invalid --speed {text!r}: expected a number > 0 (1: the captured timing) or max")
    return value


@cli.command()
@click.argument("captures", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0: a free port")
@click.option("--key", default=None, help="the only API key accepted (default: any)")
@click.option("--speed", default="1", show_default=True,
              help="1: the captured timing; N: N times faster; max: as fast as the client reads")
@click.option("--from", "start", default=None, help="first receive time to serve: ISO 8601 UTC or Unix seconds")
@click.option("--to", "end", default=None, help="last receive time to serve: ISO 8601 UTC or Unix seconds")
@click.option("--loop", is_flag=True, help="start over after the last frame")
@click.option("--max-clients", type=click.IntRange(min=1), default=64, show_default=True,
              help="connections served at once; more are closed at accept")
@click.option("--handshake-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="seconds a client has to upgrade, authenticate and subscribe before it is cut")
@click.option("--progress/--no-progress", default=True, show_default=True, help="progress on stderr")
def replay(captures: tuple[str, ...], host: str, port: int, key: str | None, speed: str, start: str | None,
           end: str | None, loop: bool, max_clients: int, handshake_timeout: float, progress: bool) -> int:
    """Serve capture files over the Polygon protocol (ws://HOST:PORT/CLUSTER) to any client, subscriptions
    honoured. Where a captured session ended, the connection ends the same way and the client's next connection (same
    API key) goes on with the next session. Prints the base URL on stdout; runs until SIGTERM/SIGINT. Exit 2 when
    a capture cannot be read or the window holds nothing, 1 when capture lines were skipped."""
    from .tools.captures import CaptureFiles
    from .local.mockserver import MockOptions
    from .tools.replay import Replay, format_ms, parse_time

    try:
        window = parse_time(start), parse_time(end)
    except ValueError as exc:
        raise ConfigError(f"invalid --from/--to: {exc}") from None
    problems = CaptureFiles(list(captures)).unreadable()
    if problems:
        raise ConfigError("; ".join(problems))
    source = Replay(captures, _speed(speed), window[0], window[1], loop, progress)
    survey = source.survey()
    if not survey.window_frames:
        span = f"they hold data from {format_ms(survey.first_ms)} to {format_ms(survey.last_ms)}" \
            if survey.first_ms is not None else "they hold no data frame"
        skipped = f"; {len(survey.skipped)} line(s) unusable, first: {survey.skipped[0]}" if survey.skipped else ""
        raise ConfigError(f"nothing to replay between {start or 'the start'} and {end or 'the end'}: {span}{skipped}")
    held = ", ".join(f"{cluster} {count:,} in {survey.sessions[cluster]} session(s)"
                     for cluster, count in sorted(survey.frames.items()))
    server = _local_server(host, port, MockOptions(api_key=key, max_clients=max_clients,
                                                   handshake_secs=handshake_timeout), source)
    server.start()
    done = _announce(server, f"replay: serving {len(captures)} capture file(s) on ws://{server.host}:{server.port}"
                             f"/CLUSTER: data frames {held}"
                             + (f"; {len(survey.skipped)} line(s) skipped" if survey.skipped else ""))
    done.wait()
    server.stop()
    if source.skipped:
        click.echo(f"replay: {len(source.skipped)} capture line(s) skipped:", err=True)
        for skipped in source.skipped[:50]:
            click.echo(f"  {skipped}", err=True)
        return 1
    return 0


@cli.command("mock-server")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0: a free port")
@click.option("--key", default=None, help="the only API key accepted (default: any)")
@click.option("--rate", type=click.FloatRange(min=0), default=100.0, show_default=True,
              help="events per second per connection (0: as fast as the client reads)")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="events per frame")
@click.option("--count", type=click.IntRange(min=0), default=0, show_default=True,
              help="events per connection, then silence (0: unlimited)")
@click.option("--reject-auth", is_flag=True, help="answer every auth with auth_failed")
@click.option("--max-connections", is_flag=True, help="evict every connection after subscribe")
@click.option("--drop-after", type=click.IntRange(min=0), default=0, help="abort each connection after N events")
@click.option("--bad-json-every", type=click.IntRange(min=0), default=0, help="every Nth frame is not JSON")
@click.option("--odd-events-every", type=click.IntRange(min=0), default=0,
              help="every Nth frame carries odd events too")
@click.option("--hang-upgrade", is_flag=True, help="accept TCP and never answer the WebSocket upgrade")
@click.option("--frame-pool", type=click.IntRange(min=0), default=0,
              help="benchmarks: cycle N pre-rendered frames as fast as the client reads (ignores --rate)")
@click.option("--hold", is_flag=True, help="complete handshakes but send no data until SIGUSR1")
@click.option("--rest-port", type=click.IntRange(0, 65535), default=None,
              help="serve the REST API for backfill on this port too (0: a free one; its URL is printed)")
@click.option("--lose-on-reconnect", type=click.IntRange(min=0), default=0, show_default=True,
              help="with --rest-port: N events happen unsent at each reconnect (REST has them)")
def mock_server(host: str, port: int, key: str | None, hold: bool, rest_port: int | None, **options) -> int:
    """Serve the Polygon protocol locally for every cluster (ws://HOST:PORT/stocks, /crypto, ...)."""
    import signal

    from .local.mockserver import MockOptions

    server = _local_server(host, port, MockOptions(api_key=key, **options))
    if rest_port is not None:
        try:
            rest_url = server.start_rest(host, rest_port)
        except OSError as exc:
            server.stop()
            raise ConfigError(f"invalid --rest-port {rest_port}: cannot listen there ({exc.strerror or exc}); "
                              "pick a free port, or 0 for any") from None
        click.echo(f"REST API on {rest_url} (POLYGON_REST_URL)", err=True)
    if hold:
        server.streaming.clear()
        signal.signal(signal.SIGUSR1, lambda *_: server.streaming.set())
    server.start()
    done = _announce(server, f"listening on ws://{server.host}:{server.port}/"
                             "{stocks,options,futures,crypto,forex,indices}")
    primed_told = False
    while not done.wait(0.05):
        if hold and not primed_told and server.primed.is_set():
            # --hold is for benchmarks: they start the clock at SIGUSR1, so say when the data is ready to go.
            click.echo("primed")
            sys.stdout.flush()
            primed_told = True
    server.stop()
    return 0


@cli.command("zmq-sub")
@click.option("--endpoint", default="tcp://127.0.0.1:5556", show_default=True, envvar="ZMQ_ENDPOINT",
              show_envvar=True)
@click.option("--connect", "connect", is_flag=True,
              help="connect to a streamer that binds (ZMQ_BIND=true); default: bind, for a streamer that connects")
@click.option("--topic", "topics", multiple=True, help="topic prefix to receive, e.g. T:AAPL or Q: (repeatable)")
@click.option("--count", "count_only", is_flag=True, help="print a count per second instead of the messages")
@click.option("--max-messages", type=click.IntRange(min=0), default=0, help="exit after this many (0: never)")
def zmq_sub(endpoint: str, connect: bool, topics: tuple[str, ...], count_only: bool, max_messages: int) -> int:
    """A ZeroMQ subscriber: prints (or counts) what the zmq sink publishes, one `topic payload` line each."""
    from .tools import zmq_sub as subscriber

    return subscriber.run(endpoint, connect, topics, count_only, max_messages)


@cli.command("redis-sub")
@click.option("--group", required=True, help="consumer group name (created at the streams' end if it is new)")
@click.option("--consumer", required=True, help="this reader's name within the group")
@click.option("--url", default="redis://127.0.0.1:6379/0", show_default=True, envvar="REDIS_URL",
              help="as REDIS_URL")
@click.option("--password-file", default=None, envvar="REDIS_PASSWORD_FILE", help="as REDIS_PASSWORD_FILE")
@click.option("--stream", default="polygon:{cluster}", show_default=True, envvar="REDIS_STREAM",
              help="the key template the sink writes (REDIS_STREAM); every key it can give is read")
@click.option("--cluster", "market", default=None, envvar="POLYGON_CLUSTER", show_envvar=True,
              help="the market cluster in {cluster} [default: from POLYGON_WS_URL's path, else futures]")
@click.option("--ws-url", default=None, envvar="POLYGON_WS_URL", show_envvar=True,
              help="the service's POLYGON_WS_URL, whose path names the cluster when --cluster is not given")
@click.option("--shards", default="16", show_default=True, envvar="REDIS_SHARDS", help="as REDIS_SHARDS")
@click.option("--redis-cluster", default="false", show_default=True, envvar="REDIS_CLUSTER",
              help="as REDIS_CLUSTER")
@click.option("--from-start", is_flag=True, help="a new group starts at the streams' first entry, not their end")
@click.option("--count", "count_only", is_flag=True, help="print a count per second instead of the records")
@click.option("--max-records", type=click.IntRange(min=0), default=0, help="exit after this many (0: never)")
def redis_sub(group: str, consumer: str, url: str, password_file: str | None, stream: str, market: str | None,
              ws_url: str | None, shards: str, redis_cluster: str, from_start: bool, count_only: bool,
              max_records: int) -> int:
    """A Redis Streams consumer-group reader (XREADGROUP + XACK): prints (or counts) the records of the redis sink;
    several readers in one group share the records, each gets its own."""
    from .tools import redis_sub as reader

    config = build_config({"redis_url": url, "redis_password_file": password_file, "redis_stream": stream,
                           "cluster": market, "ws_url": ws_url, "redis_shards": shards,
                           "redis_cluster": redis_cluster},
                          require_key=False)
    from .sinks import SinkConfigError

    try:
        return reader.run(config, group, consumer, count_only, max_records, from_start)
    except SinkConfigError as exc:
        raise ConfigError(f"redis-sub: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("redis"):
            message = config.redact(f"{type(exc).__name__}: {exc}")
            raise ConfigError(f"redis-sub: {config.redacted()['redis_url']}: {message}") from None
        raise


@cli.command("kafka-sub")
@click.option("--group", required=True, help="consumer group (a new one starts at the end; see --from-start)")
@click.option("--bootstrap", default=None, envvar="KAFKA_BOOTSTRAP", show_envvar=True, help="as KAFKA_BOOTSTRAP")
@click.option("--topic", default="polygon.{cluster}", show_default=True, envvar="KAFKA_TOPIC",
              help="the topic template the sink writes (KAFKA_TOPIC); with {type} every topic it can give is read")
@click.option("--config-file", default=None, envvar="KAFKA_CONFIG_FILE", help="as KAFKA_CONFIG_FILE")
@click.option("--cluster", "market", default=None, envvar="POLYGON_CLUSTER", show_envvar=True,
              help="the market cluster in {cluster} [default: from POLYGON_WS_URL's path, else futures]")
@click.option("--ws-url", default=None, envvar="POLYGON_WS_URL", show_envvar=True,
              help="the service's POLYGON_WS_URL, whose path names the cluster when --cluster is not given")
@click.option("--from-start", is_flag=True, help="a new group starts at the earliest offset, not the end")
@click.option("--count", "count_only", is_flag=True, help="print a count per second instead of the records")
@click.option("--max-records", type=click.IntRange(min=0), default=0, help="exit after this many (0: never)")
def kafka_sub(group: str, bootstrap: str | None, topic: str, config_file: str | None, market: str | None,
              ws_url: str | None, from_start: bool, count_only: bool, max_records: int) -> int:
    """A Kafka consumer-group reader: prints (or counts) the records of the kafka sink, committing each offset
    after its record is printed; says where each partition starts. Several readers in one group share the
    partitions."""
    from .sinks import SinkConfigError
    from .tools import kafka_sub as reader

    if bootstrap is None:
        raise ConfigError("kafka-sub: missing KAFKA_BOOTSTRAP (--bootstrap): give HOST:PORT of your Kafka brokers")
    config = build_config({"kafka_bootstrap": bootstrap, "kafka_topic": topic, "kafka_config_file": config_file,
                           "cluster": market, "ws_url": ws_url}, require_key=False)
    try:
        return reader.run(config, group, from_start, count_only, max_records)
    except SinkConfigError as exc:
        raise ConfigError(f"kafka-sub: {exc}") from None


@cli.command()
@click.option("--events", type=click.IntRange(min=1), default=1_000_000, show_default=True)
@click.option("--cluster", type=click.Choice(["stocks", "options", "futures", "crypto", "forex", "indices"]),
              default="stocks", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=100, show_default=True, help="events per frame")
@click.option("--sink", "sinks", default="ndjson", show_default=True,
              help="ndjson, zmq, redis (starts a local redis-server), kafka (starts a local Tansu broker) or a comma "
                   "list; add capture to measure its "
                   "cost (ndjson,capture)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of the table")
@click.option("--progress/--no-progress", default=True, show_default=True, help="a progress bar on stderr")
@click.option("--pinned/--no-pinned", default=True, show_default=True,
              help="also run the service pinned to one CPU, shown beside the unpinned (deployed) row")
@click.option("--backfill", is_flag=True,
              help="BACKFILL on with the same events as explicit topics (no gap: its cost on the hot path), then a "
                   "paced live feed while a backfill of 50,000 events runs")
@click.option("--gateway", "gateway", default=None, metavar="N[,N...]",
              help="then SINK=gateway beside the sinks with N client processes (e.g. 1,10,100), every client on all "
                   "topics, then each on one symbol: rates, CPU, latency; and the most clients on a quiet feed")
def bench(events: int, cluster: str, batch: int, sinks: str, as_json: bool, progress: bool, pinned: bool,
          backfill: bool, gateway: str | None) -> int:
    """Measure ceilings and the service end to end on the local server; exit 1 if anything was lost."""
    from .tools import bench as benchmark

    from .sinks import SINKS

    # Every sink of the table but stdout (the bench reads what the sinks wrote), the gateway (--gateway: it needs
    # clients) and the capture alone.
    measured = [name for name in SINKS if name not in ("stdout", "gateway")]
    chosen = [name.strip() for name in sinks.split(",") if name.strip()]
    if not chosen or any(name not in measured for name in chosen) or chosen == ["capture"]:
        raise ConfigError(f"invalid --sink {sinks!r}: expected one or a comma list of {', '.join(measured)}, the "
                          "capture only beside another (e.g. ndjson,capture)")
    counts: list[int] = []
    for part in (gateway or "").split(","):
        if part.strip():
            if not part.strip().isdigit() or not 1 <= int(part) <= 250:
                raise ConfigError(f"invalid --gateway {gateway!r}: expected client counts from 1 to 250, e.g. 1,10,100")
            counts.append(int(part))
    if counts and "ndjson" not in chosen:
        raise ConfigError("--gateway needs the ndjson sink (the clients' events are checked against its file)")
    result = benchmark.run(events, cluster, batch, chosen, progress, pinned, backfill, counts)
    click.echo(benchmark.to_json(result) if as_json else benchmark.format_table(result))
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> None:
    """Entry point: a config error is one line on stderr and exit status 2, before anything connects."""
    try:
        status = cli.main(args=argv, prog_name="polygon-streamer", standalone_mode=False)
    except ConfigError as exc:
        click.echo(f"polygon-streamer: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
