"""The domain every service shares: names, wire messages, status, functions, errors."""
