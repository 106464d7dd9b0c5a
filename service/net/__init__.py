"""Outbound network access that a webhook's content can steer (archive fetches, replays)."""
