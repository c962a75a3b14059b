"""REST routers, one per resource: jobs (and their events, report and artifacts), uploads, health."""
