"""A TCP relay in front of the test broker for old librdkafka (the booted-systemd package test runs it on Debian 12).

Tansu (the test broker) writes every tagged field of its ApiVersions v3+ response, default values included
(SupportedFeatures, FinalizedFeaturesEpoch, FinalizedFeatures, ZkMigrationReady); Apache Kafka writes a tagged field
only when it differs from its default. librdkafka before 2.1.1 skips one byte too few for each tagged field
(confluentinc/librdkafka#4278), so Debian 12's librdkafka 2.0.2 misreads Tansu's ApiVersions response ("Read
underflow", the connection never comes up) while it reads Apache Kafka's. This relay forwards every byte both ways and
rewrites only that: in an ApiVersions v3+ response it drops the response's own tagged fields, which the client does
not use. The Kafka sink is not involved: it talks to the relay as it would to a broker.

Usage: python3 kafka_tag_relay.py LISTEN_PORT BROKER_PORT (loopback; runs until killed). Test-only, stdlib only.
"""
import socket
import struct
import sys
import threading

API_VERSIONS = 18
MAX_FRAME = 64 << 20


def read_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def read_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">i", read_exact(sock, 4))
    if not 0 <= size <= MAX_FRAME:
        raise EOFError
    return read_exact(sock, size)


def uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def skip_tags(data: bytes, pos: int) -> int:
    count, pos = uvarint(data, pos)
    for _ in range(count):
        _, pos = uvarint(data, pos)
        size, pos = uvarint(data, pos)
        pos += size
    return pos


def strip_api_versions_tags(frame: bytes) -> bytes:
    """ApiVersions v3 response: correlation id, error code, compact array of (key, min, max, tags), throttle, tags."""
    pos = 4 + 2
    entries, pos = uvarint(frame, pos)
    for _ in range(max(entries - 1, 0)):
        pos = skip_tags(frame, pos + 6)
    pos += 4  # throttle_time_ms
    return frame[:pos] + b"\x00"


def relay(client: socket.socket, broker_port: int) -> None:
    broker = socket.create_connection(("127.0.0.1", broker_port))
    pending: set[int] = set()  # correlation ids of ApiVersions v3+ requests in flight
    lock = threading.Lock()

    def upstream() -> None:
        try:
            while True:
                frame = read_frame(client)
                key, version, correlation = struct.unpack(">hhi", frame[:8])
                if key == API_VERSIONS and version >= 3:
                    with lock:
                        pending.add(correlation)
                broker.sendall(struct.pack(">i", len(frame)) + frame)
        except (OSError, EOFError, struct.error):
            pass
        finally:
            broker.close()

    threading.Thread(target=upstream, daemon=True).start()
    try:
        while True:
            frame = read_frame(broker)
            (correlation,) = struct.unpack(">i", frame[:4])
            with lock:
                rewrite = correlation in pending
                pending.discard(correlation)
            if rewrite:
                frame = strip_api_versions_tags(frame)
            client.sendall(struct.pack(">i", len(frame)) + frame)
    except (OSError, EOFError, struct.error, IndexError):
        pass
    finally:
        client.close()
        broker.close()


def main() -> None:
    listen_port, broker_port = int(sys.argv[1]), int(sys.argv[2])
    server = socket.create_server(("127.0.0.1", listen_port))
    while True:
        client, _ = server.accept()
        threading.Thread(target=relay, args=(client, broker_port), daemon=True).start()


if __name__ == "__main__":
    main()
