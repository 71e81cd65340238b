"""Generation, jitted evaluation loops, benchmark metrics."""
