"""JetStream, the only state: the queue stream, KV buckets, object store and their access."""
