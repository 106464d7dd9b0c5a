"""Relay: Replicate webhooks, verified, logged forever in Postgres, and fanned out live."""
