"""Callback delivery: its own durable stream and consumer, so a slow receiver never holds up work."""
