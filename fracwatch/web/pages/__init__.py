"""The web dashboard: server-rendered Jinja2 pages, one module per area, signed in with an HttpOnly cookie."""
