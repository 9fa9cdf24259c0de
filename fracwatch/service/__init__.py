"""The wiring: the daemon, the ingest sink, the reconciler, the study lifecycle and its worker."""
