"""The edge of secateurs: settings, job schemas, errors and the command line. Never imports torch."""
