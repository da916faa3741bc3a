"""The local server: the Polygon WebSocket (mockserver) and REST (mockrest) APIs on loopback, for the demo and tests."""
