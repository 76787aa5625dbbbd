"""Mail protocols and orchestration: submission, relay, fetch, local delivery, POP3, sessions, CLI."""
