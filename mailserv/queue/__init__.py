"""The durable outbound queue (spool.py) and, later, its delivery engine."""
