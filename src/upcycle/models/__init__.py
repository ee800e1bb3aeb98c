"""The architecture map (model families as typed data, :mod:`.families`), matching a model to
it (:mod:`.matching`) and the piecewise backbone runner (:mod:`.backbone`).
:mod:`.architectures` is the old single module, kept as a re-export."""
