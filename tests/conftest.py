import pytest

from polygon_streamer.mockserver import MockOptions, MockServer


@pytest.fixture
def mock_server():
    """A started local Polygon server; the test may change server.options before the client connects."""
    from helpers import TEST_KEY

    server = MockServer(options=MockOptions(api_key=TEST_KEY, rate=2000, batch=5)).start()
    yield server
    server.stop()
