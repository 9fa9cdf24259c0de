"""The HTTP side of fracwatch serve: the admin API, the dashboard, metrics and health."""
