"""The architecture map (model families as typed data) and the piecewise backbone runner."""
