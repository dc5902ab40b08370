"""Capacity planning for AFD deployments: per-token cost and deployment search (afd-plan)."""
