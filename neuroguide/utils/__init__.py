"""Small shared helpers: atomic file writes, hashing, run outputs."""
