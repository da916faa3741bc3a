"""Gap healing (BACKFILL): what a hole in the stream lost, fetched from the REST API and delivered once, marked.

Three parts: mapping.py (the REST <-> WebSocket mapping: pure functions), desk.py (the dispatcher's side: tracks,
jobs, dedup, delivery), thread.py (the thread that asks the REST API); jobs.py holds what the two sides pass each
other through two bounded queues (jobs one way, chunks the other) and the bounds. Memory is bounded by those queues
(JOB_QUEUE jobs, DELIVERY_QUEUE chunks of CHUNK_EVENTS) and the windows (SEEN_LIMIT identities each).
"""

from .desk import Desk, Emit
from .jobs import BackfillStats
from .mapping import FILLED
from .thread import BackfillThread

__all__ = ["BackfillStats", "BackfillThread", "Desk", "Emit", "FILLED"]
