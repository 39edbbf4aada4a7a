"""Processing algorithms of the RS Deep provider: thin QGIS wrappers around the engine."""
