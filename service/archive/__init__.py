"""Output archive: every output file of a prediction, kept after Replicate deletes it."""
