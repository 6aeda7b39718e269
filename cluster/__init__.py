"""The imperative shell: CLI now; Ray actors and the deletion coordinator next."""
