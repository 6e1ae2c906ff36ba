"""The queue-worker: pulls requests, invokes functions, records outcomes, acknowledges."""
