"""jetspool: a durable async request queue for HTTP functions, on NATS JetStream.

The life of a request, one package each:

    gateway/      HTTP in: validate, store durably in JetStream, answer with a request id
    jetstream/    the state: queue stream, status and registry KV buckets, object store
    worker/       pull from the queue, invoke the function, record the outcome, acknowledge
    callbacks/    deliver callbacks from their own durable stream
    domain/       what they share: names, message types, status, functions, errors
"""

__version__ = "0.1.0"
