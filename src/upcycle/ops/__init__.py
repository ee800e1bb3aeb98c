"""Generic tensor algorithms (the exact blocked k-th value select)."""
