"""Writers of the real on-disk formats, small and seeded; the real readers read them."""
