"""The man page (debian/polygon-streamer.1), rendered from the same declarations as `--help`: every command with its
options, every setting with its variable and default, the exit statuses. A test fails when the shipped page is not
what this renders; regenerate it with `python -m polygon_streamer.manpage > debian/polygon-streamer.1`."""

from __future__ import annotations

import click

from . import __version__
from .config import SETTINGS, SETTINGS_BY_FIELD

EXIT_STATUSES = (
    ("0", "every accepted event was written (or dropped and counted by a bound the user chose: a full queue)"),
    ("1", "something accepted could not be written (the last log line says how much), a thread died, or an input "
          "line was skipped (reprocess, replay); a restart may help"),
    ("2", "a configuration error, one line on stderr, before anything connects; a restart will not help "
          "(the units do not restart on it)"),
    ("130", "interrupted by Ctrl-C before the service started"),
)


def _escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.split("\n"))


def is_setting(param: click.Parameter) -> bool:
    """An option made from a setting's declaration (cli.setting_options), not a command's own."""
    setting = SETTINGS_BY_FIELD.get(param.name or "")
    return isinstance(param, click.Option) and setting is not None and (param.help or "").startswith(setting.help)


def _options_summary(command: click.Command) -> str:
    names = []
    for param in command.params:
        if isinstance(param, click.Option) and not is_setting(param):
            names.append("/".join(param.opts + param.secondary_opts))
        elif isinstance(param, click.Argument):
            names.append(param.human_readable_name + ("..." if param.nargs == -1 else ""))
    settings = [param for param in command.params if is_setting(param)]
    summary = ", ".join(names)
    if settings:
        summary += ("; " if summary else "") + f"the settings below ({len(settings)} of them)"
    return summary or "no options"


def render(group: click.Group | None = None) -> str:
    if group is None:
        from .cli import cli

        group = cli
    lines = [
        f'.TH POLYGON-STREAMER 1 "" "polygon-streamer {__version__}" "User Commands"',
        ".SH NAME",
        "polygon-streamer \\- stream Polygon.io / Massive market data to stdout, NDJSON files, ZeroMQ and Redis",
        ".SH SYNOPSIS",
        ".B polygon-streamer",
        ".I COMMAND",
        ".RI [ OPTIONS ]",
        ".SH DESCRIPTION",
        _escape("polygon-streamer connects to the Polygon.io / Massive WebSocket API for one cluster, subscribes, "
                "normalizes every event into one JSON record and delivers it to its sinks. Every setting is an option "
                "and an environment variable (ENVIRONMENT below); a bad value exits with status 2 before connecting. "
                "`polygon-streamer COMMAND --help` shows each command's options in full."),
        ".SH COMMANDS",
    ]
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if command is None:
            continue
        # The help's first paragraph, not click's short help: its cut differs between click versions.
        first = " ".join((command.help or "").split("\n\n")[0].split())
        lines += [".TP", f".B {_escape(name)}", _escape(first),
                  ".br", _escape("Options: " + _options_summary(command) + ".")]
    lines += [".SH ENVIRONMENT",
              _escape("Each variable has an option of the same name in lower case (POLYGON_CLUSTER is --cluster, "
                      "CHANNEL_CAP is --channel-cap); the option wins.")]
    for setting in SETTINGS:
        lines += [".TP", f".B {_escape(setting.env)}",
                  _escape(f"{setting.flag}: {setting.help} (default: {setting.shown_default})")]
    lines += [".SH SIGNALS",
              _escape("SIGTERM and SIGINT stop reading, drain every queue, flush and exit within "
                      "SHUTDOWN_TIMEOUT_SECS; a second one exits at once (status 1, saying what was not written). "
                      "SIGHUP reopens the files (after logrotate moved them) and rereads SUBSCRIPTION_FILE."),
              ".SH EXIT STATUS"]
    for status, meaning in EXIT_STATUSES:
        lines += [".TP", f".B {status}", _escape(meaning)]
    lines += [".SH FILES",
              ".TP", ".I /etc/polygon-streamer/INSTANCE.env",
              _escape("environment of polygon-streamer@INSTANCE.service (see example.env)"),
              ".TP", ".I /etc/polygon-streamer/logrotate.conf",
              _escape("hourly rotation, run by polygon-streamer-logrotate.timer (or /etc/cron.d/polygon-streamer)"),
              ".TP", ".I /var/log/polygon-streamer/", "NDJSON and capture output",
              ".SH SEE ALSO",
              "/usr/share/doc/polygon-streamer/README.md,",
              "/usr/share/doc/polygon-streamer/docs/ (configuration.md has every setting; operations.md,",
              "troubleshooting.md, debian.md), /usr/share/doc/polygon-streamer/schema.md,",
              "\\fBpolygon-streamer schema\\fR"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
