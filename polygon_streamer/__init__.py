"""polygon-streamer: Polygon.io / Massive WebSocket market data to stdout, NDJSON files and ZeroMQ."""

__version__ = "0.2.0"
