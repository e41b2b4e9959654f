"""A local preview instance: Linux namespaces, and the tools its scripts call, played for real."""
