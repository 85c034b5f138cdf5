"""Public ops: validate the input once, then dispatch to a backend (SPEC §5)."""
