"""The HTTP gateway: one door, `create_app(settings)`."""
