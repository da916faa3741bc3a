"""The configuration reference (docs/configuration.md) and the instance environment file
(etc/polygon-streamer/example.env), rendered from config.py's declarations, the source `--help` is built from too.
A test fails when a shipped file is not what this renders; regenerate both with
`python -m polygon_streamer.tools.configdoc`."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from ..config import SETTINGS, SETTINGS_BY_FIELD, Setting

# The reference's sections, each setting in exactly one (a test checks).
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Connection", ("api_key", "api_key_file", "cluster", "feed", "ws_url", "subscription", "subscription_file",
                    "backoff_initial_secs", "backoff_max_secs", "read_timeout_secs", "stale_after_secs",
                    "max_frame_bytes", "heartbeat_interval_secs")),
    ("Queues and sinks", ("channel_cap", "bp_warn_interval_secs", "sink", "emit_ndjson")),
    ("NDJSON files", ("ndjson_dest", "ndjson_channel_cap", "ndjson_warn_interval_secs", "ndjson_flush_every",
                      "ndjson_flush_interval_ms", "ndjson_max_bytes", "ndjson_rotate_secs", "ndjson_gzip",
                      "ndjson_no_reopen", "ndjson_include", "ndjson_sample_quotes", "ndjson_split_per_type")),
    ("ZeroMQ", ("zmq_endpoint", "zmq_bind", "zmq_channel_cap", "zmq_warn_interval_secs", "zmq_snd_hwm",
                "zmq_topic_prefix")),
    ("Capture", ("capture_dest", "capture_channel_cap", "capture_warn_interval_secs", "capture_flush_every",
                 "capture_flush_interval_ms", "capture_max_bytes", "capture_rotate_secs", "capture_gzip")),
    ("Redis Streams", ("redis_url", "redis_password_file", "redis_stream", "redis_shards", "redis_maxlen",
                       "redis_channel_cap", "redis_warn_interval_secs", "redis_cluster")),
    ("Kafka", ("kafka_bootstrap", "kafka_topic", "kafka_config_file", "kafka_compression", "kafka_channel_cap",
               "kafka_warn_interval_secs")),
    ("Gateway", ("gateway_addr", "gateway_keys_file", "gateway_upstream", "gateway_linger_secs",
                 "gateway_client_queue", "gateway_send_interval_ms", "gateway_slow_client", "gateway_max_clients",
                 "gateway_channel_cap", "gateway_tls_cert", "gateway_tls_key")),
    ("Backfill", ("backfill", "rest_url", "backfill_max_rps", "backfill_max_secs")),
    ("Service", ("metrics_addr", "stats_interval_secs", "ready_min_messages", "ready_delay_ms", "log_level",
                 "log_format",
                 "shutdown_timeout_secs", "sink_stuck_secs", "state_dir", "cpu_affinity")),
)

# What the environment file adds for a systemd instance: what the unit sets, recipes, an example value.
UNIT_NOTES = {
    "api_key": "Keep this file 0600 root:root (systemd reads it before dropping privileges), or leave the key out of "
               "it and use POLYGON_API_KEY_FILE below.",
    "api_key_file": "With a systemd drop-in (systemctl edit polygon-streamer@INSTANCE):\n"
                    "  [Service]\n"
                    "  LoadCredential=polygon-api-key:/etc/polygon-streamer/api-key\n"
                    "  Environment=POLYGON_API_KEY_FILE=%d/polygon-api-key\n"
                    "the key file stays root-only 0600 and the service reads its private copy.",
    "cluster": "The template unit sets it to the instance name (polygon-streamer@stocks -> stocks).",
    "subscription_file": "Change the file and run `systemctl reload polygon-streamer@INSTANCE`: the difference is "
                         "sent on the live connection. The unit can read /etc/polygon-streamer.",
    "metrics_addr": "One port per instance when several clusters run on one host.",
    "sink": "The template unit sets ndjson.",
    "ndjson_dest": "The template unit sets /var/log/polygon-streamer/INSTANCE.ndjson: the only directory the hardened "
                   "unit may write, and the one the shipped logrotate configuration rotates (use that or "
                   "NDJSON_MAX_BYTES/NDJSON_ROTATE_SECS, not both).",
    "capture_dest": "The unit's log directory is writable: e.g. /var/log/polygon-streamer/INSTANCE.capture.",
    "redis_url": "Redis over its unix socket: add SupplementaryGroups=redis in a drop-in.",
    "kafka_config_file": "Keep it beside the instance's env file, mode 0640 root:polygon-streamer: it may hold a "
                         "SASL password.",
}
# Commented example values where the default is empty and an example says more.
EXAMPLES = {"subscription_file": "/etc/polygon-streamer/stocks.topics",
            "capture_dest": "/var/log/polygon-streamer/stocks.capture",
            "redis_password_file": "/etc/polygon-streamer/redis.password",
            "kafka_bootstrap": "kafka1.example.com:9092,kafka2.example.com:9092",
            "kafka_config_file": "/etc/polygon-streamer/kafka.properties"}
ENV_HEADER = """\
# polygon-streamer instance configuration: copy to /etc/polygon-streamer/INSTANCE.env (chmod 0600),
# INSTANCE being the cluster (stocks, options, futures, crypto, forex, indices), then
#   systemctl enable --now polygon-streamer@INSTANCE
# Read by systemd (EnvironmentFile=), not by a shell: no quotes, no $VAR expansion.
# Every variable of the service is listed; a commented line keeps the default shown.
# A bad value stops the service with exit status 2 and one line in the journal naming the variable.
# Generated from polygon_streamer/config.py (python -m polygon_streamer.tools.configdoc), as docs/configuration.md is.
"""
WIDTH = 118


def meaning(setting: Setting) -> str:
    return setting.doc or setting.help


def _plain(text: str) -> str:
    return text.replace("`", "").replace("**", "")


def _comment(text: str) -> list[str]:
    lines = []
    for paragraph in text.split("\n"):
        if paragraph.startswith("  "):  # a literal line (a unit drop-in): kept as it is
            lines.append("# " + paragraph)
            continue
        lines += ["# " + line for line in textwrap.wrap(paragraph, WIDTH - 2, break_on_hyphens=False)] or ["#"]
    return lines


def render_env() -> str:
    blocks = [ENV_HEADER.rstrip("\n")]
    for setting in SETTINGS:
        lines = _comment(f"{_plain(meaning(setting))} (default: {_plain(setting.shown_default)})")
        if setting.field in UNIT_NOTES:
            lines += _comment(UNIT_NOTES[setting.field])
        if setting.field == "api_key":
            lines.append(f"{setting.env}=")
        else:
            lines.append(f"#{setting.env}={EXAMPLES.get(setting.field, setting.default or '')}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_reference() -> str:
    out = ["# Configuration reference", "",
           "Generated from `polygon_streamer/config.py` (`python -m polygon_streamer.tools.configdoc`), the "
           "declarations "
           "`--help` and `etc/polygon-streamer/example.env` come from too: a test fails when they disagree.", "",
           "Every setting is an option of `run` (and of `demo`, `reprocess` where it applies) that also reads its "
           "environment variable: the option beats the variable, the variable beats the default, an empty variable "
           "counts as unset. A value that does not parse or is out of range stops the service before it connects: "
           "one line on stderr naming the variable, the value and what is accepted, exit status 2 "
           "(`polygon-streamer config --check` tries everything, sinks and port included, without connecting). "
           "Booleans take `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`), as options too: "
           "`--ndjson-gzip true`, or the bare flag `--ndjson-gzip` for true. `polygon-streamer config` prints the "
           "effective configuration, secrets redacted.",
           ""]
    for title, fields in GROUPS:
        out += [f"## {title}", "", "| variable | option | default | meaning |", "| --- | --- | --- | --- |"]
        for field in fields:
            setting = SETTINGS_BY_FIELD[field]
            out.append(f"| `{setting.env}` | `{setting.flag}` | {_cell(_code(setting.shown_default))} | "
                       f"{_cell(meaning(setting))} |")
        out.append("")
    return "\n".join(out)


def _code(text: str) -> str:
    return text if text == "unset" or text.startswith(("none", "derived")) else f"`{text}`"


def ungrouped() -> list[str]:
    grouped = [field for _, fields in GROUPS for field in fields]
    return [setting.field for setting in SETTINGS if grouped.count(setting.field) != 1] + \
        [field for field in grouped if field not in SETTINGS_BY_FIELD]


TARGETS = {"docs/configuration.md": render_reference, "etc/polygon-streamer/example.env": render_env}


def main(root: str = ".") -> int:
    for relative, render in TARGETS.items():
        Path(root, relative).write_text(render(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

