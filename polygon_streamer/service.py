"""Wires the threads (reader -> dispatcher -> sinks), relays signals, runs the graceful stop with a deadline."""

from __future__ import annotations

import gc
import logging
import math
import os
import queue
import signal
import socket
import threading
import time
from typing import Callable, Sequence

from . import __version__, affinity, logs
from .backfill import BackfillStats, BackfillThread, Desk
from .health import Health, Pulse, running_instance
from .config import Config, ConfigError, build_default_config, format_addr
from .dispatch import Dispatcher, stop_inbound
from .handover import FINISH, queued_counts
from .metrics import LatencyHistogram, MetricsServer, make_registry
from .normalize import FrameNormalizer
from .notify import Notifier
from .state import PositionFile, PositionKeeper
from .reader import Heartbeat, Reader
from .sinks import Sink, SinkConfigError, SinkQueue, SinkThread, build_sinks
from .subscriptions import FileReloader, Subscriptions

# polygon_backfill_seconds: a gap's backfill, from its first request to its summary.
BACKFILL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
_log = logs.get("polygon_streamer")
_stats_log = logs.get("polygon_stats")
MAIN_TICK_SECS = 0.1
RELOAD_WAIT_SECS = 5.0  # SIGHUP: how long READY=1 waits for the sinks to reopen their files
# The hot path allocates millions of short-lived dicts and tuples that never form cycles; with the default
# gen-0 threshold (700) the cyclic GC ran every few frames and its full passes walked every queued record
# (8.7% of the dispatcher's time in a profile). Collections still run, just far less often.
GC_THRESHOLDS = (50_000, 20, 100)


class Service:
    def __init__(self, config: Config, sinks: list[tuple[Sink, SinkQueue]] | None = None,
                 stop_after_events: int | None = None, notifier: Notifier | None = None):
        self.config = config
        self.notifier = notifier or Notifier()
        self.stop_after_events = stop_after_events
        self.inbound: queue.Queue = queue.Queue(config.channel_cap)
        self.normalizer = FrameNormalizer(config.cluster, socket.gethostname(), __version__,
                                          config.ndjson_include, config.ndjson_sample_quotes, config.subscription)
        self.latency = LatencyHistogram()
        try:
            built = build_sinks(config) if sinks is None else sinks
        except SinkConfigError as exc:
            raise ConfigError(str(exc)) from None
        self.sinks = [sink for sink, _ in built]
        self.sink_queues = [sink_queue for _, sink_queue in built]
        # The sink fed every message as received (the capture), if one is chosen: the reader and the dispatcher
        # hand it the wire; the others get records.
        self.capture_queue = next((q for sink, q in built if sink.takes == "wire"), None)
        dispatched = [q for q in self.sink_queues if q is not self.capture_queue]
        for sink_queue in dispatched:
            sink_queue.normalizer = self.normalizer  # sink_drop gap records
        self.subscriptions = Subscriptions(config.subscription.split(","), config.subscription_file or "SUBSCRIPTION")
        self.reader = Reader(config, self.inbound, self.capture_queue, self.subscriptions)
        # BACKFILL: the dispatcher's desk and the thread that asks the REST API (backfill/).
        self.backfill_stats = BackfillStats()
        self.backfill_stats.seconds = LatencyHistogram(BACKFILL_BUCKETS)
        desk = Desk(config.cluster, config.backfill, self.normalizer, self.subscriptions, self.backfill_stats,
                    self.inbound) if config.backfill else None
        self.backfill = BackfillThread(config, desk, self.backfill_stats) if desk is not None else None
        self.dispatcher = Dispatcher(self.inbound, self.normalizer, dispatched, self.latency,
                                     config.bp_warn_interval_secs, self.capture_queue, desk)
        self.sink_threads = [SinkThread(sink, sink_queue) for sink, sink_queue in built]
        for sink in self.sinks:
            sink.use_subscriptions(self.subscriptions)
        if any(sink.extra_topics for sink in self.sinks):
            self.dispatcher.union = self.subscriptions
        self.heartbeat = Heartbeat(self.reader, config.heartbeat_interval_secs) \
            if config.heartbeat_interval_secs > 0 else None
        self.status = Health(config, self.reader.state, self.subscriptions.active, self.sinks, self.sink_threads,
                             self.threads)
        self.registry = make_registry(self)
        self.metrics_server: MetricsServer | None = None
        self._signals: queue.SimpleQueue = queue.SimpleQueue()
        self._stop_signalled = False
        self._deadline = math.inf  # the drain's, once shutdown() began
        self.frames_fed = 0  # frames an offline caller put into the inbound queue itself (reprocess)
        # STATE_DIR: the stream position between runs (state.py); the main thread saves it.
        self.position = PositionKeeper(PositionFile(config.state_dir, config.cluster), self.normalizer,
                                       self.reader.handover, self.dispatcher.desk) if config.state_dir else None
        self.check_notes: list[str] = []  # what config --check adds to its OK line
        self.subscription_file = FileReloader(self.subscriptions, config.subscription_file) \
            if config.subscription_file else None

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self, network: bool = True, threads: bool = True) -> None:
        """Open sinks and bind the metrics port before connecting; problems there are config errors (exit 2).
        network=False (reprocess): the sinks and the dispatcher only; the caller feeds the inbound queue.
        threads=False (check): the checks alone, nothing started."""
        opened: list[Sink] = []
        try:
            for sink in self.sinks:
                sink.open()
                opened.append(sink)
            try:
                if network:
                    self.metrics_server = MetricsServer(self.config.metrics_addr, self.registry, self.status.health,
                                                        self.status.ready, self._subscriptions_view,
                                                        self.config.redact)
            except OSError as exc:
                running = None if threads else running_instance(self.config.metrics_addr)
                if running is None:
                    raise ConfigError(f"invalid METRICS_ADDR (--metrics-addr) "
                                      f"{format_addr(self.config.metrics_addr)!r}: cannot listen there "
                                      f"({exc.strerror or exc}); pick a free host:port") from None
                # config --check of a running instance: its own port is taken by itself.
                self.check_notes.append(f"METRICS_ADDR {format_addr(self.config.metrics_addr)} is in use by a "
                                        f"running polygon-streamer ({running}): not bound again")
            if not threads:
                self._cpus()
                self.check_notes += [note for sink in self.sinks if (note := sink.check())]
                return
            self._confine()
        except SinkConfigError as exc:
            for sink in opened:
                sink.close()
            raise ConfigError(str(exc)) from None
        except ConfigError:
            for sink in opened:
                sink.close()
            raise
        self._log_configuration(network)
        for sink in self.sinks:
            for warning in sink.start_warnings(self.config):
                _log.warning(warning, extra={"fields": {"sink": sink.name}})
        if network and self.position is not None:
            self.position.restore(self.subscriptions.describe())
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        for thread in self.sink_threads:
            thread.start()
        self.dispatcher.start()
        if not network:
            return
        self.reader.start()
        if self.backfill:
            self.backfill.start()
        if self.heartbeat:
            self.heartbeat.start()
        metrics_server = self.metrics_server
        assert metrics_server is not None, "bound by open()"
        metrics_server.start()
        _log.info("started", extra={"fields": {"version": __version__, "cluster": self.config.cluster,
                                               "sinks": ",".join(self.config.sinks),
                                               "metrics": format_addr(metrics_server.address)}})

    def check(self) -> None:
        """Every check start() makes before connecting, then everything released (`config --check`): the sinks
        open (files and their directories, the ZeroMQ endpoint, Redis), the metrics port binds, CPU_AFFINITY
        parses. A file the check created is removed again (so a check run as root leaves no root-owned file for the
        service user). Raises ConfigError with the line `run` would print."""
        paths = [path for sink in self.sinks for path in sink.files() if not os.path.exists(path)]
        try:
            self.start(network=True, threads=False)
        finally:
            for sink in self.sinks:
                sink.close(time.monotonic())
            if self.metrics_server is not None:
                self.metrics_server.close()
            for path in paths:
                if os.path.isfile(path) and os.path.getsize(path) == 0:
                    os.unlink(path)

    def _log_configuration(self, network: bool) -> None:
        """One short line of what matters (the rest: `polygon-streamer config`); its fields are the settings that
        differ from their defaults, secrets redacted; the whole configuration at debug."""
        config = self.config
        shown = config.redacted(offline=not network)
        defaults = build_default_config().redacted(offline=not network)
        changed = {name: value for name, value in shown.items() if defaults.get(name) != value}
        sinks = ", ".join(f"{sink.name} -> {where}" if (where := sink.destination()) else sink.name
                          for sink in self.sinks)
        topics = self.subscriptions.describe() if network else None
        summary = f"cluster {config.cluster}, sinks {sinks}" + (f", subscription {topics}" if topics else "")
        if network:
            summary += f", metrics {format_addr(config.metrics_addr)}"
        summary += f", backfill {','.join(config.backfill) or 'off'}"
        if config.state_dir:
            summary += f", position in {config.state_dir}"
        config_log = logs.get("polygon_config")
        config_log.info("configuration: %s (polygon-streamer config shows every setting)", summary,
                        extra={"fields": changed})
        config_log.debug("effective configuration", extra={"fields": shown})

    def _cpus(self):
        """The CPUs CPU_AFFINITY chooses (None: off); ConfigError if it cannot."""
        try:
            return affinity.choose(self.config.cpu_affinity, self.config.cluster)
        except ValueError as exc:
            raise ConfigError(f"invalid CPU_AFFINITY (--cpu-affinity) {self.config.redacted()['cpu_affinity']!r}: "
                              f"{exc}") from None

    def _confine(self) -> None:
        """CPU_AFFINITY, for this thread and so for every thread started after it (affinity.py says why)."""
        shown = self.config.redacted()["cpu_affinity"]
        cpus = self._cpus()
        if cpus is None:
            return
        allowed = sorted(os.sched_getaffinity(0))
        affinity.confine_calling_thread(cpus)
        _log.info("threads confined to CPU %s of %s (CPU_AFFINITY=%s)", ",".join(map(str, sorted(cpus))),
                  ",".join(map(str, allowed)), shown, extra={"fields": {"cpus": sorted(cpus), "allowed": allowed}})

    def _subscriptions_view(self) -> dict:
        """GET /subscriptions: the upstream set and its states, and what each sink that serves clients says."""
        view = self.subscriptions.snapshot()
        sinks = {sink.name: shown for sink in self.sinks if (shown := sink.subscriptions_view()) is not None}
        return {**view, "sinks": sinks} if sinks else view

    def install_signal_handlers(self) -> None:
        """Handlers only record; the main thread acts (run())."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda number, _frame: self._signals.put_nowait(number))

    def stop_requested(self) -> bool:
        """Whether SIGTERM/SIGINT came (for a caller that feeds the pipeline itself: reprocess)."""
        while not self._stop_signalled:
            try:
                signum = self._signals.get_nowait()
            except queue.Empty:
                break
            self._stop_signalled = signum in (signal.SIGTERM, signal.SIGINT)
        return self._stop_signalled

    def request_stop(self) -> None:
        self._signals.put_nowait(signal.SIGTERM)

    def run(self) -> int:
        """The main thread's loop: signals, thread health, stats; returns the exit status."""
        next_stats = time.monotonic() + self.config.stats_interval_secs
        last = self._counts()
        pulse = Pulse(self.status, self.notifier, lambda: self.normalizer.events)
        while True:
            try:
                signum = self._signals.get(timeout=MAIN_TICK_SECS)
            except queue.Empty:
                signum = None
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop_signalled = True
                return self.shutdown(f"received {signal.Signals(signum).name}")
            if signum == signal.SIGHUP:
                self.notifier.reloading()
                self._reopen()
                self.notifier.ready(self.status.status_text())
            dead = self.dead_threads()
            if dead:
                _log.error("stopping: thread(s) died: %s", ", ".join(dead), extra={"fields": {"threads": dead}})
                self.shutdown("a thread died")
                return 1
            if self.stop_after_events is not None and self.normalizer.events >= self.stop_after_events:
                return self.shutdown(f"delivered {self.stop_after_events} events")
            now = time.monotonic()
            pulse.beat(now)
            if self.position is not None:
                self.position.save()
            if self.config.stats_interval_secs > 0 and now >= next_stats:
                last = self._log_stats(last, self.config.stats_interval_secs)
                next_stats = now + self.config.stats_interval_secs

    def _reopen(self) -> None:
        if self.subscription_file is not None:
            self.subscription_file.reread()
        if self.config.ndjson_no_reopen:
            _log.info("SIGHUP ignored (NDJSON_NO_REOPEN)")
            return
        _log.info("SIGHUP: reopening files")
        for thread in self.sink_threads:
            thread.reopened.clear()
            thread.reopen_requested.set()
        # READY=1 (the end of the reload for systemd and logrotate) once the files are open again, not before; a
        # sink stuck in a write is not waited for past RELOAD_WAIT_SECS (the watchdog and /health tell of it).
        deadline = time.monotonic() + RELOAD_WAIT_SECS
        for thread in self.sink_threads:
            while thread.is_alive() and not thread.reopened.wait(MAIN_TICK_SECS) and time.monotonic() < deadline:
                pass

    def shutdown(self, why: str, timeout_secs: float | None = None) -> int:
        """Stop reading, drain every queue, flush and close every sink, all within SHUTDOWN_TIMEOUT_SECS (an offline
        tool gives math.inf: it waits for its queues as long as they move; a signal then ends the wait, counted).
        Exit 0 only when every accepted event was written or counted as dropped by a bound the user chose."""
        self.status.stopping = True
        self.notifier.stopping(f"stopping ({why}): draining queues")
        timeout_secs = self.config.shutdown_timeout_secs if timeout_secs is None else timeout_secs
        deadline = self._deadline = time.monotonic() + timeout_secs
        _log.info("stopping (%s): draining queues", why,
                  extra={"fields": {"reason": why, "inbound_handovers": self.inbound.qsize(),
                                    "deadline_secs": timeout_secs if math.isfinite(timeout_secs) else None}})
        self.reader.stop()
        if self.backfill:
            self.backfill.stop()  # at once: its open gaps' summaries say shutdown
        if self.heartbeat:
            self.heartbeat.stop()
        # A reader stuck in a TCP connect has accepted nothing: do not let it eat the drain deadline.
        self._join([self.reader], min(deadline, time.monotonic() + 2.0))
        for thread in self.sink_threads:
            thread.close_deadline = deadline  # a sink whose disk refuses keeps retrying until then
        drained = self._stop_inbound() and self._join([self.dispatcher, *self.sink_threads])
        if self._deadline != deadline:  # a signal brought it forward
            timeout_secs = self.config.shutdown_timeout_secs
        if self.metrics_server:
            self.metrics_server.stop()
        counts = self._counts()
        events, frames, unwritten_words = self._unwritten()
        unwritten = events + frames
        fields = dict(counts, unwritten_events=events, unwritten_capture_frames=frames)
        if self.position is not None:
            self.position.save(clean=drained and not unwritten, force=True)
        if drained and not unwritten:
            notes = [note for note in (sink.close_report() for sink in self.sinks) if note]
            _log.info("stopped: every accepted event was handed to the sinks and flushed" +
                      "".join(f"; {note}" for note in notes), extra={"fields": dict(counts, notes=notes)})
            return 0
        if drained:
            # Per sink, all it did not write: taken and lost at its close, in its buffer, still in its queue.
            failed = {thread.sink.name: thread.unwritten_at_close + thread.buffered_events() + thread.pending_events()
                      for thread in self.sink_threads if thread.crashed is not None or thread.unwritten_at_close}
            _log.error("stopped: %s accepted were not written (%s); %d dropped and counted",
                       unwritten_words, ", ".join(f"{name}: {count}" for name, count in failed.items()),
                       counts["sink_drops"], extra={"fields": dict(fields, failed_sinks=list(failed))})
            return 1
        self.dispatcher.stop()
        _log.error("stopped at the %gs deadline with %s not written", timeout_secs,
                   unwritten_words, extra={"fields": fields})
        return 1

    def _stop_inbound(self) -> bool:
        """Queue STOP behind the accepted frames (and the gap records of holes data never came back from),
        answering a second SIGTERM/SIGINT while the queue is full."""
        # Open backfills end first (their summaries say shutdown), then the holes data never came back from: the
        # order reprocess reproduces from a capture.
        now_ms = time.time_ns() // 1_000_000
        finish = [(now_ms, FINISH)] if self.backfill else []
        for item in finish + self.reader.shutdown_items(now_ms):
            while True:
                try:
                    self.inbound.put(item, timeout=MAIN_TICK_SECS)
                    break
                except queue.Full:
                    if time.monotonic() >= self._deadline:
                        return False
                    self._check_second_signal()
        while time.monotonic() < self._deadline:
            if stop_inbound(self.inbound, min(self._deadline, time.monotonic() + MAIN_TICK_SECS)):
                return True
            self._check_second_signal()
        return False

    def _join(self, threads: Sequence[threading.Thread], deadline: float | None = None) -> bool:
        """Join with a deadline (the drain's unless given); a second SIGTERM/SIGINT meanwhile exits at once."""
        for thread in threads:
            while thread.is_alive():
                remaining = (self._deadline if deadline is None else deadline) - time.monotonic()
                if remaining <= 0:
                    return False
                thread.join(min(MAIN_TICK_SECS, remaining))
                self._check_second_signal()
        return True

    def _check_second_signal(self) -> None:
        try:
            signum = self._signals.get_nowait()
        except queue.Empty:
            return
        if signum in (signal.SIGTERM, signal.SIGINT) and not self._stop_signalled:
            # The first stop signal, during a drain that had no deadline (an offline tool waits as long as its
            # sinks move): the drain now ends within SHUTDOWN_TIMEOUT_SECS, then says what was not written.
            self._stop_signalled = True
            deadline = time.monotonic() + self.config.shutdown_timeout_secs
            if deadline < self._deadline:
                self._deadline = deadline
                for thread in self.sink_threads:
                    thread.close_deadline = deadline
                _log.warning("received %s: the drain ends within %gs", signal.Signals(signum).name,
                             self.config.shutdown_timeout_secs)
            return
        if signum in (signal.SIGTERM, signal.SIGINT):
            events, frames, unwritten_words = self._unwritten()
            _log.error("second %s: exiting now with %s not written", signal.Signals(signum).name, unwritten_words,
                       extra={"fields": {"unwritten_events": events, "unwritten_capture_frames": frames}})
            logging.shutdown()
            os._exit(1)

    def unwritten_events(self) -> int:
        """Events accepted and not written (the capture's frames aside: unwritten_capture_frames)."""
        return queued_counts(self.inbound)[0] + sum(
            thread.pending_events() + thread.buffered_events() + thread.unwritten_at_close
            for thread in self.sink_threads if thread.sink_queue is not self.capture_queue)

    def unwritten_capture_frames(self) -> int:
        """With capture, the messages accepted for it and not written."""
        if self.capture_queue is None:
            return 0
        return queued_counts(self.inbound)[1] + sum(
            thread.pending_events() + thread.buffered_events() + thread.unwritten_at_close
            for thread in self.sink_threads if thread.sink_queue is self.capture_queue)

    def _unwritten(self) -> tuple[int, int, str]:
        """(events, captured frames) not written and the words for them, for the shutdown lines."""
        events, frames = self.unwritten_events(), self.unwritten_capture_frames()
        return events, frames, f"{events} event(s)" + (f" and {frames} captured frame(s)" if frames else "")

    # -- what the service says about itself (health.py) -------------------------------------------------------

    def threads(self) -> list[threading.Thread]:
        threads: list[threading.Thread] = [self.reader, self.dispatcher, *self.sink_threads]
        if self.heartbeat:
            threads.append(self.heartbeat)
        if self.backfill:
            threads.append(self.backfill)
        if self.metrics_server:
            threads.append(self.metrics_server.thread)
        return threads

    def dead_threads(self) -> list[str]:
        return self.status.dead_threads()

    # -- stats --------------------------------------------------------------------------------------------------

    def _counts(self) -> dict:
        reader = self.reader.stats
        return {
            "frames": reader.messages_received + self.frames_fed,
            "events": self.normalizer.events,
            "gaps": sum(self.normalizer.gaps.values()),
            "channel_drops": self.reader.handover.stats.channel_drops,
            "sink_drops": sum(q.stats.dropped for q in self.sink_queues),
            # what each sink wrote: what its thread handed it, less what it could not write
            "written": {thread.sink_queue.name: max(0, thread.sink_queue.stats.written - thread.unwritten_at_close
                                                    - thread.buffered_events()) for thread in self.sink_threads},
            "parse_errors": self.normalizer.parse_errors,
            "bad_events": sum(self.normalizer.bad_events.values()),
            "reconnects": reader.reconnects,
        }

    def _log_stats(self, last: dict, interval: float) -> dict:
        """Every STATS_INTERVAL_SECS, a progress line a person can read: events/s, written per sink, gaps, drops."""
        counts = self._counts()
        fields = dict(counts)
        fields["events_per_sec"] = round((counts["events"] - last["events"]) / interval, 1)
        fields["connected"] = self.reader.stats.connected
        fields["queue_depth"] = {"inbound": self.inbound.qsize(),
                                 **{q.name: q.queue.qsize() for q in self.sink_queues}}
        written = ", ".join(f"{name} {count:,}" for name, count in counts["written"].items())
        drops = counts["channel_drops"] + counts["sink_drops"]
        _stats_log.info("%s events/s; written: %s; %d gap(s)%s%s", f"{fields['events_per_sec']:,.0f}", written,
                        counts["gaps"], f", {drops:,} dropped" if drops else "",
                        "" if fields["connected"] else "; not connected", extra={"fields": fields})
        return counts


def run_service(config: Config, stop_after_events: int | None = None,
                on_started: Callable[[Service], None] | None = None, notifier: Notifier | None = None) -> int:
    service = Service(config, stop_after_events=stop_after_events, notifier=notifier)
    # Before start(): a SIGTERM while the sinks open is queued and run() stops at once, instead of the default
    # action killing the process (status -15) with nothing to say.
    service.install_signal_handlers()
    service.start()
    if on_started:
        on_started(service)
    # The sinks are open and the metrics port is bound: ready (not "data flows": markets close).
    service.notifier.ready(service.status.status_text())
    return service.run()
