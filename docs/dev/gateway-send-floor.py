"""The floor under the gateway's cost per message and client (docs/dev/benchmark-history.md, "The gateway sending
from its own thread"): nothing but one non-blocking send() per message per client, 100 loopback TCP clients read by
another process, 1,000 messages/s each of 132 bytes (a stocks trade as one WebSocket message). Prints the CPU of the
sending process. Run: python3 docs/dev/gateway-send-floor.py"""

import socket
import subprocess
import sys
import time

CLIENTS, RATE, SECS = 100, 1000, 5

READER = """
import selectors, socket, sys
selector = selectors.DefaultSelector()
for _ in range({clients}):
    selector.register(socket.create_connection(("127.0.0.1", {port})), selectors.EVENT_READ)
while True:
    for key, _ in selector.select():
        if not key.fileobj.recv(65536):
            sys.exit(0)
"""


def main() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    reader = subprocess.Popen([sys.executable, "-c", READER.format(clients=CLIENTS, port=port)])
    connections = [server.accept()[0] for _ in range(CLIENTS)]
    message = b"\x81\x7e\x00\x80" + b"x" * 128
    started, cpu_before, sent = time.monotonic(), time.process_time(), 0
    next_at = started
    while time.monotonic() - started < SECS:
        for connection in connections:
            connection.send(message, socket.MSG_DONTWAIT)
        sent += CLIENTS
        next_at += 1 / RATE
        wait = next_at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    cpu, wall = time.process_time() - cpu_before, time.monotonic() - started
    print(f"{sent:,} sends in {wall:.1f}s: {cpu / wall * 100:.1f}% of a core, {cpu / sent * 1e6:.2f} us per send")
    for connection in connections:
        connection.close()
    reader.wait(10)


if __name__ == "__main__":
    main()
