"""Files copied as they are into the bundle a Linux board runs (not imported by edgecc)."""
