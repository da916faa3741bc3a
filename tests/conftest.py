import pytest

from helpers import TEST_KEY, Streamer, base_env, free_port
from polygon_streamer.local.mockserver import MockOptions, MockServer


@pytest.fixture
def mock_server():
    """A started local Polygon server; the test may change server.options before the client connects."""
    server = MockServer(options=MockOptions(api_key=TEST_KEY, rate=2000, batch=5)).start()
    yield server
    server.stop()


@pytest.fixture
def spawn(mock_server):
    """Start `polygon-streamer` child processes against mock_server (cluster, command, args, then settings as env).

    At teardown every one still running is killed, and none may have printed the API key.
    """
    started = []

    def start(cluster="stocks", command="run", args=(), **settings):
        streamer = Streamer(base_env(mock_server.url(cluster), free_port(), **settings), command, args)
        started.append(streamer)
        return streamer

    yield start
    for streamer in started:
        if streamer.proc.poll() is None:
            streamer.proc.kill()
            streamer.proc.wait(5)
        assert TEST_KEY not in streamer.all_output(), "the API key leaked into the output"
