"""The OpenAI-compatible HTTP server (see README.md); `api_server.build_app` is the entry."""
