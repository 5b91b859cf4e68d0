"""`make bench`: pg_recvlogical (limit), Debezium embedded (peer) and our pipeline, side by side.

Run as ``python -m bench`` (``--quick`` for a sub-minute smoke run); see docs/benchmarks.md.
"""
